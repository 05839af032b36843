"""The BPD code's protocol: its balanced test folds (optional, not recommended) and
examples/bpd.yaml, which mirrors the public code and lists its deliberate deviations."""

from pathlib import Path

import numpy as np
import pytest

from stagewise.evaluation.splits import SplitError, balanced_test_folds, make_splits
from stagewise.recipe import AugmentConfig, ProtocolConfig, ThawStage, load_recipe

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "bpd.yaml"


def _cohort():
    """22 positive and 41 negative patients, one to three images each, in manifest order."""
    rng = np.random.default_rng(0)
    patients, y = [], []
    for i in range(63):
        n = int(rng.integers(1, 4))
        patients += [f"p{i:02d}"] * n
        y += [int(i % 3 == 0 or i < 2)] * n
    return np.array(y), np.array(patients)


def test_balanced_test_folds_are_the_bpd_codes():
    y, patients = _cohort()
    pos = sorted(set(patients[y == 1]))
    neg = sorted(set(patients[y == 0]))
    splits = make_splits(y, patients, ProtocolConfig(kind="balanced_test", folds=5, repeats=2), seed=100)
    assert len(splits) == 10
    for r in range(2):
        folds = [s for s in splits if s.repeat == r]
        tested_pos, tested_neg = [], []
        for s in folds:
            test_p, train_p = set(patients[s.test]), set(patients[s.train])
            assert not test_p & train_p and test_p | train_p == set(patients)  # grouped, complete
            fold_pos = [p for p in test_p if p in pos]
            assert len(fold_pos) == len(test_p) - len(fold_pos)  # 1:1 at patient level
            tested_pos += fold_pos
            tested_neg += [p for p in test_p if p in neg]
        assert sorted(tested_pos) == pos  # every positive tested once per repeat
        assert len(set(tested_neg)) == len(tested_neg) == len(pos)  # negatives at most once ...
        assert len(neg) - len(tested_neg) == 19  # ... and 19 of 41 never tested
        assert sorted(len([p for p in set(patients[s.test]) if p in pos]) for s in folds) == [4, 4, 4, 5, 5]
    # the code's draw: one RandomState(seed + repeat) permutes positives, then negatives
    rng = np.random.RandomState(100)
    first_chunk = np.array_split(rng.permutation(np.array(list(dict.fromkeys(patients[y == 1])), dtype=object)), 5)[0]
    assert set(first_chunk) <= set(patients[splits[0].test])
    again = make_splits(y, patients, ProtocolConfig(kind="balanced_test", folds=5, repeats=2), seed=100)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(splits, again))


def test_balanced_test_folds_need_enough_negatives():
    y = np.array([1] * 6 + [0] * 4)
    with pytest.raises(SplitError, match="balanced_test needs .* as many negative as positive"):
        list(balanced_test_folds(y, np.arange(10).astype(str), 5, 0))


def test_bpd_example_mirrors_the_public_code_and_states_its_deviations():
    recipe = load_recipe(EXAMPLE)
    assert recipe.data.resize == "stretch" and recipe.data.image_size == 512
    for arm in recipe.arms[:2]:
        probe, thaw = arm.stages
        assert isinstance(thaw, ThawStage)
        assert probe.weight_decay == 1e-4 and probe.augment.active and probe.cutmix is None
        assert thaw.weight_decay == {"head": 1e-5, "layer4": 1e-4, "layer3": 1e-4, "layer2": 1e-4}
        assert thaw.lr == {"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4, "layer2": 1e-4}
        aug: AugmentConfig = thaw.augment
        assert aug.flip and aug.rotate == 5 and aug.crop.scale == (0.95, 1.05)
        assert (aug.blur.kernel, aug.blur.p, aug.blur.sigma) == (9, 0.5, (0.05, 2.0))
        assert (aug.mask.fraction, aug.mask.p) == (0.25, 0.1)
    assert recipe.arms[0].stages[1].augment.mask.value == 0.5  # 0 after torchxrayvision's scaling
    assert recipe.arms[1].stages[0].augment.mask.value == 0.45 and recipe.arms[1].stages[0].augment.crop is not None
    header = EXAMPLE.read_text().split("\nname:")[0]
    for deviation in ("threshold", "stratified", "manifest order", "glob"):
        assert deviation in header, deviation
