"""ISLES'22 metrics on hand-made volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from stroke_ray.metrics import (
    abs_lesion_count_diff,
    dice,
    hd95,
    isles_metrics,
    label_lesions,
    lesion_counts,
    lesion_f1,
)


def _vol(shape=(8, 8, 8)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_diagonal_touching_lesions_are_one_26_component():
    m = _vol()
    m[1:3, 1:3, 1:3] = 1
    m[3:5, 3:5, 3:5] = 1  # touches the first block only at a corner
    assert label_lesions(m)[1] == 1
    assert label_lesions(m, connectivity=6)[1] == 2
    assert ndimage.label(m)[1] == 2  # scipy default = 6-connectivity
    assert ndimage.label(m, structure=np.ones((3, 3, 3)))[1] == 1


def test_lesion_counts_agree_with_scipy_on_random_masks():
    rng = np.random.default_rng(0)
    for density in (0.05, 0.2, 0.4):
        m = rng.random((12, 10, 9)) < density
        n_ours = label_lesions(m)[1]
        assert n_ours == ndimage.label(m, structure=np.ones((3, 3, 3)))[1]
        assert n_ours > 1


def test_empty_empty():
    e = _vol()
    assert isles_metrics(e, e, (1, 1, 1)) == {
        "dice": 1.0,
        "abs_volume_diff_ml": 0.0,
        "abs_lesion_count_diff": 0.0,
        "lesion_f1": 1.0,
    }
    assert hd95(e, e, (1, 1, 1)) == 0.0


def test_empty_prediction_with_ground_truth():
    truth = _vol()
    truth[2:4, 2:4, 2:4] = 1  # 8 voxels
    truth[6, 6, 6] = 1  # 1 voxel, a second lesion
    m = isles_metrics(_vol(), truth, (2.0, 2.0, 2.0))
    assert m["dice"] == 0.0
    assert m["abs_volume_diff_ml"] == pytest.approx(9 * 8 / 1000)
    assert m["abs_lesion_count_diff"] == 2.0
    assert m["lesion_f1"] == 0.0
    assert hd95(_vol(), truth, (1, 1, 1)) == math.inf
    assert hd95(truth, _vol(), (1, 1, 1)) == math.inf


def test_volume_difference_anisotropic_spacing():
    truth, pred = _vol(), _vol()
    truth[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred[0:2, 0:2, 0:3] = 1  # 12 voxels
    spacing = (0.449, 0.449, 5.0)
    expected = 4 * 0.449 * 0.449 * 5.0 / 1000
    assert isles_metrics(pred, truth, spacing)["abs_volume_diff_ml"] == pytest.approx(expected)
    assert dice(pred, truth) == pytest.approx(2 * 8 / 20)


def test_lesion_f1_known_cases():
    truth = _vol((10, 10, 10))
    truth[1:3, 1:3, 1:3] = 1  # lesion A
    truth[6:8, 6:8, 6:8] = 1  # lesion B
    pred = _vol((10, 10, 10))
    pred[1, 1, 1] = 1  # hits A with one voxel
    pred[4, 0, 8] = 1  # a false positive
    assert lesion_counts(pred, truth) == (1, 1, 1)
    assert lesion_f1(pred, truth) == pytest.approx(1 / (1 + 1))
    # One predicted blob spanning both lesions: both are tp, no fp (official semantics).
    blob = _vol((10, 10, 10))
    blob[1:8, 1:8, 1:8] = 1
    assert lesion_counts(blob, truth) == (2, 0, 0)
    assert lesion_f1(blob, truth) == 1.0
    assert abs_lesion_count_diff(blob, truth) == 1
    # Only false positives.
    assert lesion_f1(truth, _vol((10, 10, 10))) == 0.0
    assert lesion_counts(truth, _vol((10, 10, 10))) == (0, 2, 0)


def test_hd95_against_known_shift():
    truth, pred = _vol((16, 16, 16)), _vol((16, 16, 16))
    truth[4:10, 4:10, 4:10] = 1
    pred[4:10, 4:10, 5:11] = 1  # shifted one voxel along Z
    assert hd95(pred, truth, (1, 1, 1)) == pytest.approx(1.0)
    assert hd95(pred, truth, (1, 1, 3.0)) == pytest.approx(3.0)
    assert hd95(truth, truth, (1, 1, 1)) == 0.0


def test_shape_and_spacing_errors():
    with pytest.raises(ValueError, match="differs"):
        isles_metrics(_vol((4, 4, 4)), _vol((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        isles_metrics(_vol(), _vol(), (1, 1))


def test_real_isles_case_volume_and_lesion_counts(isles_sample):
    import nibabel as nib

    img = nib.load(isles_sample / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz")
    truth = np.asarray(img.dataobj) > 0
    spacing = img.header.get_zooms()[:3]
    m = isles_metrics(np.zeros_like(truth), truth, spacing)
    assert m["abs_volume_diff_ml"] == pytest.approx(523 * 8 / 1000)  # 523 voxels of 2 mm
    assert m["abs_lesion_count_diff"] == ndimage.label(truth, structure=np.ones((3, 3, 3)))[1] > 0
    assert isles_metrics(truth, truth, spacing)["lesion_f1"] == 1.0


def test_lesion_counts_by_size_bins_true_and_false_lesions():
    from stroke_ray.metrics import f1_from_counts, lesion_counts, lesion_counts_by_size

    truth = np.zeros((60, 60, 60), bool)
    pred = np.zeros_like(truth)
    truth[2:5, 2:5, 2:5] = True  # 27 voxels of 8 mm^3 = 0.216 ml: small, detected
    pred[3, 3, 3] = True
    truth[20:22, 20:22, 20:22] = True  # 0.064 ml: small, missed
    truth[30:45, 30:45, 30:36] = True  # 1350 voxels = 10.8 ml: large, detected
    pred[30:40, 30:40, 30:36] = True
    pred[50:56, 50:56, 50:56] = True  # 216 voxels = 1.728 ml: a medium false positive
    counts = lesion_counts_by_size(pred, truth, (2.0, 2.0, 2.0))
    assert counts == {
        "<1ml": {"tp": 1, "fp": 0, "fn": 1},
        "1-10ml": {"tp": 0, "fp": 1, "fn": 0},
        ">10ml": {"tp": 1, "fp": 0, "fn": 0},
    }
    # The bins add up to the whole-case counts.
    tp, fp, fn = lesion_counts(pred, truth)
    assert (tp, fp, fn) == tuple(sum(c[k] for c in counts.values()) for k in ("tp", "fp", "fn"))
    assert f1_from_counts(1, 0, 1) == pytest.approx(2 / 3) and f1_from_counts(0, 0, 0) is None
