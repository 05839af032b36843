import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("STAGEWISE_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory):
    """A small real-image cohort: scikit-learn's scanned digits, 3 vs 8, two scans per patient."""
    from stagewise.demo import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("digits"), per_class=40)


def small_recipe(manifest, arms, **overrides):
    """A recipe dict for fast tests: 32 px, float32 on CPU, 3 folds."""
    from stagewise.recipe import recipe_from_dict

    data = {
        "name": "test",
        "seed": 0,
        "cohort": {"manifest": str(manifest)},
        "data": {"image_size": 32},
        "protocol": {"folds": 3, "repeats": 1},
        "compute": {"device": "cpu", "precision": "fp32", "channels_last": False},
        "arms": arms,
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe_from_dict(data)
