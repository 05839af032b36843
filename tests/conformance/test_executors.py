"""Every executor the recipe accepts (`compute.executor`) runs the same small study to the
same numbers as fitting in this process: where the fits run never changes a fold's result.
(tests/e2e/test_executor_ray.py covers the Ray executor on a two-node cluster in depth.)"""

from __future__ import annotations

from typing import get_args

import pandas as pd
import pytest

from conftest import same_numbers, small_recipe
from stagewise.recipe import ComputeConfig

pytestmark = pytest.mark.ray_of_its_own  # starts Ray itself: the tests' shared instance is stopped first (conftest)

EXECUTORS = get_args(ComputeConfig.model_fields["executor"].annotation)
ARMS = [{"name": "a", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1, "batch_size": 16}]}]


def study(manifest, executor: str):
    return small_recipe(manifest, ARMS, protocol={"folds": 2}, evaluation={"saliency": 0, "bootstrap": 0, "report": False},
                        compute={"executor": executor, "threads": 1})


@pytest.fixture(scope="module")
def in_process(digits_manifest, tmp_path_factory):
    from stagewise.study import SilentReporter, run_study

    return run_study(study(digits_manifest, "local"), tmp_path_factory.mktemp("local") / "run", SilentReporter())


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_every_executor_gives_the_numbers_of_an_in_process_run(executor, in_process, digits_manifest, tmp_path):
    from stagewise.study import SilentReporter, run_study

    result = run_study(study(digits_manifest, executor), tmp_path / "run", SilentReporter())
    pd.testing.assert_frame_equal(result.predictions, in_process.predictions)
    assert same_numbers(result.metrics["arms"]["a"]["folds"], in_process.metrics["arms"]["a"]["folds"])
