"""Small-component removal and the choice of its minimum size."""

from __future__ import annotations

import numpy as np
import pytest

from stroke_ray.metrics import dice, label_lesions, lesion_f1
from stroke_ray.postprocess import (
    CANDIDATES,
    MIN_DICE_GAIN,
    MIN_LESION_ML_CANDIDATES,
    N_SCORES,
    THRESHOLD_CANDIDATES,
    Postprocessing,
    choose_postprocessing,
    criterion_by_min_size,
    postprocess_scores,
    postprocessed_score,
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


def _scores(dices: dict[float, float] | None = None, criteria: dict[tuple[float, float], float] | None = None):
    """A mean score vector: Dice 0.5 at every threshold and criterion 0.5 everywhere, but as given."""
    dices, criteria = dices or {}, criteria or {}
    return np.array([dices.get(t, 0.5) for t in THRESHOLD_CANDIDATES] + [criteria.get(c, 0.5) for c in CANDIDATES])


def test_the_threshold_is_chosen_by_dice_and_only_for_a_real_gain():
    assert len(_scores()) == N_SCORES == len(THRESHOLD_CANDIDATES) * (1 + len(MIN_LESION_ML_CANDIDATES))
    assert choose_postprocessing(_scores()) == Postprocessing(0.0, 0.5)  # all tied: change nothing
    assert choose_postprocessing(_scores({0.3: 0.5 + MIN_DICE_GAIN / 2})).threshold == 0.5  # noise
    assert choose_postprocessing(_scores({0.3: 0.6, 0.2: 0.6})).threshold == 0.3  # ties: the higher
    assert choose_postprocessing(_scores({0.3: 0.6, 0.2: 0.7})).threshold == 0.2
    # a threshold whose criterion looks best but whose Dice does not gain is not chosen
    assert choose_postprocessing(_scores(criteria={(0.1, 0.0): 1.0})).threshold == 0.5
    with pytest.raises(ValueError):
        choose_postprocessing([0.5, 0.7])


def test_the_size_is_chosen_at_the_threshold_and_ties_go_to_the_smaller_size():
    chosen = choose_postprocessing(_scores({0.3: 0.6}, {(0.3, 0.1): 0.9, (0.3, 0.2): 0.9, (0.5, 0.5): 1.0}))
    assert chosen == Postprocessing(min_lesion_ml=0.1, threshold=0.3)
    assert postprocessed_score(_scores({0.3: 0.6}, {(0.3, 0.1): 0.9}), chosen) == 0.9


def test_a_whole_brain_mask_at_a_low_threshold_is_not_chosen():
    # A model that has learned nothing: probability 0.15 over the whole volume, 0.3 nowhere.
    # At 0.1 one component covers the volume and touches both lesions: the ISLES'22 lesion
    # F1 is 1.0 (no false component), but the Dice is ~0, and Dice decides the threshold.
    mask, parts = _components()
    truth = parts[1] | parts[4]
    prob = np.full(mask.shape, 0.15, np.float32)
    scores = postprocess_scores(prob, truth, SPACING)
    assert lesion_f1(prob >= 0.1, truth) == 1.0 and dice(prob >= 0.1, truth) < 0.01
    assert choose_postprocessing(scores).threshold == 0.5


def test_scores_threshold_the_probability_at_each_line():
    mask, parts = _components()
    truth = parts[27] | parts[1]
    # the true lesions at probability 0.35, the false ones at 0.6: only thresholds <= 0.3 find the truth
    prob = (parts[27] | parts[1]) * 0.35 + (parts[4] | parts[8]) * 0.6
    got = postprocess_scores(prob, truth, SPACING)
    assert got.shape == (N_SCORES,)
    for i, t in enumerate(THRESHOLD_CANDIDATES):
        assert got[i] == pytest.approx(dice(prob >= t, truth))
    for (t, size), value in zip(CANDIDATES, got[len(THRESHOLD_CANDIDATES):]):
        kept = remove_small_lesions(prob >= t, SPACING, size)
        assert value == pytest.approx(0.5 * (dice(kept, truth) + lesion_f1(kept, truth)))
    # Thresholds 0.3, 0.2 and 0.1 see the same masks: the highest wins the tie; at it 0.1 ml
    # removes the false 4- and 8-voxel lesions (and the true 1-voxel one) best.
    assert choose_postprocessing(got) == Postprocessing(min_lesion_ml=0.1, threshold=0.3)


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
