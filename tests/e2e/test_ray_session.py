"""A study's federated folds share one private Ray instance, which ends with the run."""

import pytest

from conftest import small_recipe
from stagewise.study import run_study

pytestmark = pytest.mark.ray_of_its_own  # starts Ray itself: the tests' shared instance is stopped first (conftest)

QUIET = {"saliency": 0, "bootstrap": 50, "report": False}


def test_a_studys_federated_folds_share_one_ray_instance_that_ends_with_the_run(sites_manifest, tmp_path):
    """Flower's engine would start and stop Ray for every fold's simulation; the study keeps
    one private instance for all of them and stops it when the run ends."""
    import ray

    from stagewise.study import SilentReporter

    class Watch(SilentReporter):
        nodes: list = []

        def fold_done(self, arm, split, metrics, resumed):
            self.nodes.append(ray.get_runtime_context().get_node_id() if ray.is_initialized() else None)

    arms = [{"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
             "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 16}]}]
    recipe = small_recipe(sites_manifest, arms, protocol={"folds": 2}, evaluation=QUIET,
                          cohort={"manifest": str(sites_manifest), "site": "hospital"})
    watch = Watch()
    run_study(recipe, tmp_path / "run", watch)
    assert len(watch.nodes) == 2 and watch.nodes[0] is not None and watch.nodes[0] == watch.nodes[1]
    assert not ray.is_initialized()
