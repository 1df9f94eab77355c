"""ISLES'22 evaluation metrics, with the challenge's definitions (ezequieldlrosa/isles22,
utils/eval_utils.py), plus the 95th-percentile Hausdorff distance.

* dice: 2|P & T| / (|P| + |T|); 1.0 when both masks are empty.
* abs_volume_diff_ml: | |P| - |T| | * voxel volume, voxel volume = prod(spacing) mm^3 / 1000 (ml).
* abs_lesion_count_diff: | #components(T) - #components(P) |, 26-connected 3D components.
* lesion_f1: tp / (tp + (fp + fn) / 2) with, as in the official code,
    tp = ground-truth components that share at least one voxel with the prediction,
    fn = ground-truth components that share none,
    fp = predicted components that share no voxel with the ground truth;
  1.0 when both masks are empty. tp counts ground-truth lesions, fp counts predicted ones:
  one predicted blob covering two true lesions gives tp = 2, fp = 0.

Components are labelled with connected-components-3d (cc3d, 26-connectivity): it is what
the official scorer uses, it is fast (a single pass over the volume, C++), and well kept.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import cc3d
import numpy as np

__all__ = [
    "CONNECTIVITY",
    "METRIC_KEYS",
    "abs_lesion_count_diff",
    "abs_volume_diff_ml",
    "dice",
    "hd95",
    "isles_metrics",
    "label_lesions",
    "lesion_counts",
    "lesion_f1",
    "voxel_volume_ml",
]

CONNECTIVITY = 26
# The four ISLES'22 case metrics, in the order `isles_metrics` returns them.
METRIC_KEYS = ("dice", "abs_volume_diff_ml", "abs_lesion_count_diff", "lesion_f1")


def _binary_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape}")
    return pred, truth


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in millilitres (spacing in mm)."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def label_lesions(mask: np.ndarray, connectivity: int = CONNECTIVITY) -> tuple[np.ndarray, int]:
    """Connected-component labels (0 = background, 1..n) and n."""
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=bool), connectivity=connectivity, return_N=True)
    return labels, int(n)


def dice(pred: np.ndarray, truth: np.ndarray, empty_value: float = 1.0) -> float:
    """Dice coefficient of two binary masks; `empty_value` when both are empty."""
    pred, truth = _binary_pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return float(empty_value)
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def abs_volume_diff_ml(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Absolute difference of the lesion volumes, in ml."""
    pred, truth = _binary_pair(pred, truth)
    return abs(int(pred.sum()) - int(truth.sum())) * voxel_volume_ml(spacing)


def abs_lesion_count_diff(pred: np.ndarray, truth: np.ndarray) -> int:
    """Absolute difference of the numbers of 26-connected lesions."""
    pred, truth = _binary_pair(pred, truth)
    return abs(label_lesions(truth)[1] - label_lesions(pred)[1])


def lesion_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """Lesion-wise (tp, fp, fn) with the official ISLES'22 semantics (module docstring)."""
    pred, truth = _binary_pair(pred, truth)
    truth_labels, n_truth = label_lesions(truth)
    pred_labels, n_pred = label_lesions(pred)
    hit_truth = np.unique(truth_labels[pred & truth])  # truth components touched by the prediction
    tp = int(np.count_nonzero(hit_truth))
    touching_pred = np.unique(pred_labels[pred & truth])
    fp = n_pred - int(np.count_nonzero(touching_pred))
    return tp, fp, n_truth - tp


def lesion_f1(pred: np.ndarray, truth: np.ndarray, empty_value: float = 1.0) -> float:
    """Lesion-wise F1 = tp / (tp + (fp + fn) / 2); `empty_value` when both masks are empty."""
    tp, fp, fn = lesion_counts(pred, truth)
    if tp + fp + fn == 0:
        return float(empty_value)
    return tp / (tp + (fp + fn) / 2)


# Lesion-size bins of the accuracy benchmark, in ml: small (< 1 ml: embolic dots, lacunes),
# medium (1-10 ml), large (> 10 ml: territorial infarcts).
SIZE_BINS_ML = (("<1ml", 0.0, 1.0), ("1-10ml", 1.0, 10.0), (">10ml", 10.0, float("inf")))


def lesion_counts_by_size(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], bins=SIZE_BINS_ML
) -> dict[str, dict[str, int]]:
    """Lesion-wise (tp, fp, fn) per lesion-size bin, with the ISLES'22 semantics of
    `lesion_counts`: a true lesion is detected when the prediction touches it (tp, binned by
    the true lesion's volume, else fn); a predicted component touching no true lesion is a
    false positive, binned by its own volume. Sum the counts over cases, then take
    `f1_from_counts`, to get a dataset's F1 per bin.
    """
    pred, truth = _binary_pair(pred, truth)
    voxel_ml = voxel_volume_ml(spacing)
    out = {name: {"tp": 0, "fp": 0, "fn": 0} for name, _, _ in bins}

    def bin_of(volume_ml: float) -> str:
        return next(name for name, lo, hi in bins if lo <= volume_ml < hi)

    truth_labels, n_truth = label_lesions(truth)
    if n_truth:
        sizes = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)
        hit = np.zeros(n_truth + 1, bool)
        hit[np.unique(truth_labels[pred & truth])] = True
        for label in range(1, n_truth + 1):
            out[bin_of(sizes[label] * voxel_ml)]["tp" if hit[label] else "fn"] += 1
    pred_labels, n_pred = label_lesions(pred)
    if n_pred:
        sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
        touching = np.zeros(n_pred + 1, bool)
        touching[np.unique(pred_labels[pred & truth])] = True
        for label in range(1, n_pred + 1):
            if not touching[label]:
                out[bin_of(sizes[label] * voxel_ml)]["fp"] += 1
    return out


def f1_from_counts(tp: int, fp: int, fn: int) -> float | None:
    """tp / (tp + (fp + fn) / 2); None when there is nothing to count."""
    if tp + fp + fn == 0:
        return None
    return tp / (tp + (fp + fn) / 2)


def isles_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The four ISLES'22 case metrics of a binary prediction against the ground truth."""
    pred, truth = _binary_pair(pred, truth)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not have one entry per axis of shape {pred.shape}")
    return {
        "dice": dice(pred, truth),
        "abs_volume_diff_ml": abs_volume_diff_ml(pred, truth, spacing),
        "abs_lesion_count_diff": float(abs_lesion_count_diff(pred, truth)),
        "lesion_f1": lesion_f1(pred, truth),
    }


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI, Euclidean, surface voxels).

    Empty cases: 0.0 when both masks are empty (they agree); inf when exactly one is empty
    (no surface to measure to: the worst possible distance). Use np.isfinite to filter."""
    pred, truth = _binary_pair(pred, truth)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0
    if has_pred != has_truth:
        return float("inf")
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI's own internals pass a deprecated argument; nothing for callers to act on.
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(
            pred[None, None].astype(np.float32),
            truth[None, None].astype(np.float32),
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(distance.item())
