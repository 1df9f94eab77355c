"""k-fold splits: deterministic, disjoint, covering every subject; the fold a run trains."""

from __future__ import annotations

import pytest

from stroke_ray.config import DataConfig, TrainConfig
from stroke_ray.errors import ConfigError
from stroke_ray.splits import fold_splits, split_subjects, train_val_subjects

SUBJECTS = [f"sub-{i:03d}" for i in range(23)]


@pytest.mark.parametrize("k", [2, 3, 5, 23])
def test_folds_are_disjoint_cover_every_subject_and_are_balanced(k):
    folds = fold_splits(SUBJECTS, k, seed=0)
    assert len(folds) == k
    flat = [s for fold in folds for s in fold]
    assert sorted(flat) == SUBJECTS and len(flat) == len(set(flat))  # disjoint, complete
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert all(fold == sorted(fold) for fold in folds)


def test_folds_are_deterministic_order_free_and_seeded():
    folds = fold_splits(SUBJECTS, 5, seed=0)
    assert folds == fold_splits(list(reversed(SUBJECTS)), 5, seed=0)
    assert folds != fold_splits(SUBJECTS, 5, seed=1)
    for bad in (1, 24):
        with pytest.raises(ValueError, match="folds need"):
            fold_splits(SUBJECTS, bad)
    with pytest.raises(ValueError, match="unique"):
        fold_splits(["a", "a", "b"], 2)


def test_each_fold_trains_on_the_others_and_every_subject_is_validated_once():
    seen = []
    for fold in range(4):
        data = DataConfig(fold=fold, num_folds=4, split_seed=3)
        train, val = train_val_subjects(SUBJECTS, data)
        assert not set(train) & set(val) and sorted(train + val) == SUBJECTS
        assert val == fold_splits(SUBJECTS, 4, seed=3)[fold]
        seen += val
    assert sorted(seen) == SUBJECTS
    # No fold: the hold-out split, as before.
    assert train_val_subjects(SUBJECTS, DataConfig(val_fraction=0.3)) == split_subjects(SUBJECTS, 0.3, 0)


def test_fold_outside_the_folds_is_a_config_error():
    with pytest.raises(ConfigError, match="fold 5 is not one of the 5 folds"):
        TrainConfig.from_dict({"data": {"fold": 5, "num_folds": 5}})
    with pytest.raises(ConfigError, match="num_folds"):
        TrainConfig.from_dict({"data": {"num_folds": 1}})
