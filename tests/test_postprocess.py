"""Small-component removal and the choice of its minimum size."""

from __future__ import annotations

import numpy as np
import pytest

from stroke_ray.metrics import dice, label_lesions, lesion_f1
from stroke_ray.postprocess import (
    CANDIDATES,
    MIN_LESION_ML_CANDIDATES,
    THRESHOLD_CANDIDATES,
    Postprocessing,
    choose_postprocessing,
    criterion_by_candidate,
    criterion_by_min_size,
    remove_small_lesions,
)

SPACING = (2.0, 2.0, 2.0)  # 0.008 ml a voxel


def _components() -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Components of 1, 4, 8 and 27 voxels; the 8-voxel one is a diagonal chain (26-connected)."""
    mask = np.zeros((24, 24, 24), np.uint8)
    parts = {n: np.zeros_like(mask) for n in (1, 4, 8, 27)}
    parts[1][2, 2, 2] = 1
    parts[4][6:8, 6:8, 2] = 1
    for i in range(8):
        parts[8][10 + i, 2 + i, 12 + i] = 1
    parts[27][16:19, 16:19, 16:19] = 1
    for part in parts.values():
        mask |= part
    return mask, parts


def test_removal_removes_exactly_the_components_below_the_size():
    mask, parts = _components()
    assert label_lesions(mask)[1] == 4
    # 8 voxels = 0.064 ml: the minimum itself is kept, everything smaller goes.
    out = remove_small_lesions(mask, SPACING, 8 * 0.008)
    np.testing.assert_array_equal(out, parts[8] | parts[27])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(remove_small_lesions(mask, SPACING, 0.0), mask)
    np.testing.assert_array_equal(remove_small_lesions(mask, SPACING, 0.0081), mask - parts[1])
    assert not remove_small_lesions(mask, SPACING, 27 * 0.008 + 1e-6).any()
    # Voxel volume matters: at 1 mm^3 the same minimum removes all but the 27-voxel one.
    np.testing.assert_array_equal(remove_small_lesions(mask, (1, 1, 1), 0.01), parts[27])
    with pytest.raises(ValueError, match=">= 0"):
        remove_small_lesions(mask, SPACING, -1.0)


def test_criterion_matches_the_metrics_of_each_removed_mask():
    mask, parts = _components()
    truth = parts[27] | parts[1]  # a true 1-voxel lesion and a big one; 4- and 8-voxel ones are false
    candidates = (0.0, 0.01, 0.05, 0.1, 0.5)
    got = criterion_by_min_size(mask, truth, SPACING, candidates)
    for size, value in zip(candidates, got):
        removed = remove_small_lesions(mask, SPACING, size)
        assert value == pytest.approx(0.5 * (dice(removed, truth) + lesion_f1(removed, truth)))
    assert got[4] == 0.0  # everything removed
    assert len(criterion_by_min_size(mask, truth, SPACING)) == len(MIN_LESION_ML_CANDIDATES)


def test_choice_maximises_the_criterion_and_ties_go_to_the_higher_threshold_then_the_smaller_size():
    sizes = len(MIN_LESION_ML_CANDIDATES)
    assert CANDIDATES[0] == (0.5, 0.0) and len(CANDIDATES) == len(THRESHOLD_CANDIDATES) * sizes
    flat = np.full(len(CANDIDATES), 0.7)
    assert choose_postprocessing(flat) == Postprocessing(0.0, 0.5)  # all tied: change nothing
    best = flat.copy()
    best[CANDIDATES.index((0.3, 0.1))] = 0.9
    best[CANDIDATES.index((0.2, 0.1))] = 0.9  # tied with a higher threshold: not chosen
    best[CANDIDATES.index((0.3, 0.2))] = 0.9  # tied with a smaller size: not chosen
    assert choose_postprocessing(best) == Postprocessing(min_lesion_ml=0.1, threshold=0.3)
    with pytest.raises(ValueError):
        choose_postprocessing([0.5, 0.7])


def test_criterion_by_candidate_thresholds_the_probability_at_each_line():
    mask, parts = _components()
    truth = parts[27] | parts[1]
    # the true lesions at probability 0.35, the false ones at 0.6: only thresholds <= 0.3 find the truth
    prob = (parts[27] | parts[1]) * 0.35 + (parts[4] | parts[8]) * 0.6
    got = criterion_by_candidate(prob, truth, SPACING)
    assert got.shape == (len(CANDIDATES),)
    for (t, size), value in zip(CANDIDATES, got):
        kept = remove_small_lesions(prob >= t, SPACING, size)
        assert value == pytest.approx(0.5 * (dice(kept, truth) + lesion_f1(kept, truth)))
    chosen = choose_postprocessing(got)
    # Thresholds 0.3, 0.2 and 0.1 see the same masks: the highest of them wins the tie, and
    # 0.1 ml removes the false 4- and 8-voxel lesions (and the true 1-voxel one) best.
    assert (chosen.threshold, chosen.min_lesion_ml) == (0.3, 0.1)
    assert got[CANDIDATES.index((0.3, 0.1))] == got.max() > got[CANDIDATES.index((0.5, 0.1))]


def test_postprocessing_round_trips_and_applies_threshold_then_removal():
    post = Postprocessing(min_lesion_ml=0.05, threshold=0.3)
    assert Postprocessing.from_dict(post.to_dict()) == post
    assert Postprocessing.from_dict(None) == Postprocessing(0.0, 0.5)
    mask, parts = _components()
    prob = mask * 0.4  # above 0.3, below 0.5
    np.testing.assert_array_equal(post.apply(prob, SPACING), parts[8] | parts[27])
    assert not Postprocessing().apply(prob, SPACING).any()
    for bad in ({"min_lesion_ml": -1}, {"threshold": 1.5}, {"min_lesion_ml": float("nan")}):
        with pytest.raises(ValueError):
            Postprocessing.from_dict(bad)
