"""Threshold and small-component removal, both chosen on validation cases.

A segmentation network trained on patches predicts, besides the true lesions, small false
components (bright DWI rims, noise). Removing every 26-connected component smaller than a
minimum volume takes most of them away, at the risk of removing true small lesions; which
size is right depends on the model and the data, so it is chosen on validation cases:

* the threshold comes first: the one of `THRESHOLD_CANDIDATES` with the best mean Dice over
  the cases, on the case's own grid; it replaces 0.5 only when it gains at least
  `MIN_DICE_GAIN`. Dice, not the lesion F1, decides it: the ISLES'22 lesion F1 counts a
  true lesion as found when any predicted voxel touches it, so a low threshold that marks
  the whole brain scores lesion F1 1.0 (one component, touching every lesion, none false);
  its Dice is near 0;
* then the size: for every minimum volume of `MIN_LESION_ML_CANDIDATES` (0 = remove
  nothing) the criterion is (Dice + lesion F1) / 2 of the prediction at that threshold
  after removal, against the ground truth (`metrics.dice`, `metrics.lesion_f1`: the
  ISLES'22 definitions); the chosen size maximises its mean over the cases, ties going to
  the smaller size, so removal only happens when it helps.

The threshold is chosen because a network trained briefly on patches is under-confident
where lesions are faint or a few voxels small: its probability there peaks at 0.2-0.5,
and the lesion is found or missed by where the line is drawn (docs/accuracy.md).

The choice travels with the model as `Postprocessing` in the checkpoint payload
(`postprocessing: {min_lesion_ml, threshold}`); a checkpoint without it means no removal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from stroke_ray.metrics import dice, label_lesions, lesion_f1, voxel_volume_ml

__all__ = [
    "CANDIDATES",
    "MIN_DICE_GAIN",
    "MIN_LESION_ML_CANDIDATES",
    "N_SCORES",
    "THRESHOLD_CANDIDATES",
    "Postprocessing",
    "choose_postprocessing",
    "criterion_by_min_size",
    "postprocess_scores",
    "postprocessed_score",
    "remove_small_lesions",
]

# 0 plus a 1-2-5 ladder from one 1 mm^3 voxel (0.001 ml) to 2 ml: fine enough where false
# components live (a few voxels to a fraction of a ml), short enough to cost little on every
# validation case of every epoch, and identical on every worker so sums can be all-reduced.
MIN_LESION_ML_CANDIDATES: tuple[float, ...] = (
    0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
)
# Probability thresholds, in order of preference (ties go to the earlier one).
THRESHOLD_CANDIDATES: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)
# Mean Dice a threshold must gain over 0.5 to be chosen: below it, noise on a few cases.
MIN_DICE_GAIN = 0.01
# Every (threshold, minimum size) pair: with one Dice per threshold in front, the layout of
# the score vectors that validation sums over cases and workers (`postprocess_scores`).
CANDIDATES: tuple[tuple[float, float], ...] = tuple(
    (t, s) for t in THRESHOLD_CANDIDATES for s in MIN_LESION_ML_CANDIDATES
)
N_SCORES = len(THRESHOLD_CANDIDATES) + len(CANDIDATES)
# Component volumes are voxel counts times the voxel volume; this slack keeps a component
# of exactly the minimum size from being removed by floating-point rounding.
_RELATIVE_SLACK = 1e-9


@dataclass(frozen=True)
class Postprocessing:
    """How a model's probabilities become a mask: threshold, then small-component removal."""

    min_lesion_ml: float = 0.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not (self.min_lesion_ml >= 0.0 and np.isfinite(self.min_lesion_ml)):
            raise ValueError(f"min_lesion_ml must be a finite number >= 0, got {self.min_lesion_ml}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "Postprocessing":
        """The stored settings; None or {} (older checkpoints) = threshold 0.5, no removal."""
        raw = dict(raw or {})
        return cls(min_lesion_ml=float(raw.get("min_lesion_ml", 0.0)), threshold=float(raw.get("threshold", 0.5)))

    def apply(self, probability: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """The uint8 mask of `probability` (threshold, then removal) on a grid of `spacing` mm."""
        mask = np.asarray(probability) >= self.threshold
        return remove_small_lesions(mask, spacing, self.min_lesion_ml)


def _kept_labels(sizes: np.ndarray, voxel_ml: float, min_lesion_ml: float) -> np.ndarray:
    """Boolean per label (index 0 = background, never kept): component volume >= the minimum."""
    keep = sizes * voxel_ml >= min_lesion_ml * (1.0 - _RELATIVE_SLACK)
    keep[0] = False
    return keep


def remove_small_lesions(mask: np.ndarray, spacing: Sequence[float], min_lesion_ml: float) -> np.ndarray:
    """`mask` (uint8) without its 26-connected components smaller than `min_lesion_ml` ml.

    Args:
        mask: binary (X, Y, Z) array.
        spacing: voxel size in mm along each axis.
        min_lesion_ml: components with a volume below this are removed; 0 keeps everything.

    Raises:
        ValueError: `min_lesion_ml` is negative.
    """
    if min_lesion_ml < 0:
        raise ValueError(f"min_lesion_ml must be >= 0, got {min_lesion_ml}")
    binary = np.asarray(mask).astype(bool)
    if min_lesion_ml == 0 or not binary.any():
        return binary.astype(np.uint8)
    labels, n = label_lesions(binary)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return _kept_labels(sizes, voxel_volume_ml(spacing), min_lesion_ml)[labels].astype(np.uint8)


def criterion_by_min_size(
    mask: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    candidates: Sequence[float] = MIN_LESION_ML_CANDIDATES,
) -> np.ndarray:
    """(Dice + lesion F1) / 2 of `mask` against `truth` after removal at each candidate size.

    Args:
        mask: the thresholded prediction (X, Y, Z).
        truth: the ground-truth mask on the same grid.
        spacing: voxel size in mm.
        candidates: minimum lesion sizes in ml.

    Returns:
        float64 array, one value per candidate.
    """
    binary = np.asarray(mask).astype(bool)
    truth = np.asarray(truth).astype(bool)
    labels, n = label_lesions(binary)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    voxel_ml = voxel_volume_ml(spacing)
    out = np.empty(len(candidates), dtype=np.float64)
    seen: dict[bytes, float] = {}
    for i, size in enumerate(candidates):
        keep = _kept_labels(sizes, voxel_ml, float(size))
        key = keep.tobytes()
        if key not in seen:  # most candidates keep the same components: score each set once
            kept = keep[labels]
            seen[key] = 0.5 * (dice(kept, truth) + lesion_f1(kept, truth))
        out[i] = seen[key]
    return out


def postprocess_scores(probability: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """What the choice of a case's postprocessing is made from: the Dice of `probability` at
    every threshold of `THRESHOLD_CANDIDATES`, then (Dice + lesion F1) / 2 for every entry of
    `CANDIDATES` (threshold, then removal).

    Args:
        probability: the foreground probability (X, Y, Z) on the truth's grid.
        truth: the ground-truth mask.
        spacing: voxel size in mm.

    Returns:
        float64 array of N_SCORES values; sum them over cases, then `choose_postprocessing`.
    """
    probability = np.asarray(probability)
    masks = [probability >= t for t in THRESHOLD_CANDIDATES]
    dices = [dice(m, truth) for m in masks]
    return np.concatenate([dices, *(criterion_by_min_size(m, truth, spacing) for m in masks)])


def choose_postprocessing(mean_scores: Sequence[float]) -> Postprocessing:
    """The threshold with the best mean Dice (0.5 unless another gains `MIN_DICE_GAIN`; ties
    go to the higher threshold), then at it the size with the best mean criterion (ties go
    to the smaller size), from `postprocess_scores` averaged over cases.

    Raises:
        ValueError: not N_SCORES values.
    """
    scores = np.asarray(mean_scores, dtype=np.float64)
    if scores.shape != (N_SCORES,):
        raise ValueError(f"{scores.size} scores for {N_SCORES} (thresholds and candidates)")
    dices = scores[: len(THRESHOLD_CANDIDATES)]
    best = 0
    for i in range(1, len(THRESHOLD_CANDIDATES)):
        if dices[i] >= dices[0] + MIN_DICE_GAIN and dices[i] > dices[best] + 1e-12:
            best = i
    threshold = THRESHOLD_CANDIDATES[best]
    sizes = len(MIN_LESION_ML_CANDIDATES)
    row = scores[len(THRESHOLD_CANDIDATES):].reshape(len(THRESHOLD_CANDIDATES), sizes)[best]
    size = 0
    for j in range(1, sizes):
        # A strict improvement beyond rounding noise is needed to prefer a larger size.
        if row[j] > row[size] + 1e-12:
            size = j
    return Postprocessing(min_lesion_ml=MIN_LESION_ML_CANDIDATES[size], threshold=threshold)


def postprocessed_score(mean_scores: Sequence[float], chosen: Postprocessing) -> float:
    """The mean (Dice + lesion F1) / 2 of the `chosen` postprocessing, from the same scores."""
    index = len(THRESHOLD_CANDIDATES) + CANDIDATES.index((chosen.threshold, chosen.min_lesion_ml))
    return float(np.asarray(mean_scores, dtype=np.float64)[index])
