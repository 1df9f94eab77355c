"""Validation in each case's own space, as `stroke-ray predict` and the ISLES'22 scorer see it.

Every validation subject is rebuilt from the store's native level as the `PreparedCase`
that `predict` would make from its NIfTI files (raw image, mask, affine, the subject's
normalisation statistics: `store_case`) and goes through the same
`inference.predict_case` call, so the per-epoch metrics are the metrics `predict` would
write for that case with the same weights. Scores:

* `val_<metric>`: ISLES'22 metrics (`metrics.METRIC_KEYS`) on the native grid, after the
  probability is mapped back from the training level; the metric Tune optimises.
* `val_level_<metric>`: the same on the training level's grid against the store's level
  mask (reported only when the level is not the native grid, where they differ).
* `postprocess_threshold`, `postprocess_min_lesion_ml` and `val_postprocessed_score`: the
  threshold and small-component removal size chosen on these cases
  (`postprocess.choose_postprocessing`) and their mean (Dice + lesion F1) / 2; every
  checkpoint carries the choice made on its own validation.

Workers validate disjoint shards of the subjects; `ValidationTotals` holds sums that are
added over workers (`vector` / `from_vector`) before they become means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from stroke_ray.config import TrainConfig
from stroke_ray.grid import spacing_of
from stroke_ray.inference import Prediction, normalise_case, predict_case
from stroke_ray.ingest import PreparedCase
from stroke_ray.metrics import METRIC_KEYS, isles_metrics
from stroke_ray.postprocess import (
    N_SCORES,
    Postprocessing,
    choose_postprocessing,
    postprocess_scores,
    postprocessed_score,
)
from stroke_ray.store import NATIVE

__all__ = [
    "SubjectScores",
    "ValidationTotals",
    "predict_subject",
    "score_subject",
    "store_case",
    "validate",
]

THRESHOLD = 0.5


def store_case(store, subject: str) -> PreparedCase:
    """A subject of the store as `ingest.load_case` made it from its files (native level)."""
    return PreparedCase(
        subject=subject,
        modalities=store.modalities,
        image=np.asarray(store.image(subject, NATIVE)[...], dtype=np.float32),
        mask=np.asarray(store.mask(subject, NATIVE)[...], dtype=np.uint8),
        affine=store.affine(subject, NATIVE),
        attrs=store.meta(subject),
    )


def predict_subject(
    model: torch.nn.Module,
    store,
    subject: str,
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    amp: bool = False,
    multiple: int = 1,
    tta_axes: Sequence[int] = (),
    batch_size: int | None = None,
) -> tuple[PreparedCase, Prediction]:
    """The subject's case and its prediction, through the call `predict` makes."""
    case = store_case(store, subject)
    prediction = predict_case(
        model, case, level=cfg.data.level, patch_size=cfg.data.patch_size,
        normalization=store.normalization, overlap=cfg.val_overlap,
        batch_size=batch_size or cfg.batch_size, device=device, threshold=THRESHOLD,
        multiple=multiple, amp=amp, tta_axes=tta_axes,
    )
    return case, prediction


@dataclass
class SubjectScores:
    """One validation subject's scores."""

    subject: str
    native: dict[str, float]  # isles_metrics on the reference grid
    level: dict[str, float] | None  # isles_metrics on the training level (None at native)
    postprocess: np.ndarray  # postprocess.postprocess_scores: what the postprocessing is chosen from


def score_subject(store, subject: str, case: PreparedCase, prediction: Prediction, level: str) -> SubjectScores:
    """ISLES'22 metrics of a prediction on the native grid and on the training level."""
    spacing = spacing_of(case.affine)
    native = isles_metrics(prediction.mask, case.mask, spacing)
    level_scores = None
    if prediction.level_probability is not None:
        truth = np.asarray(store.mask(subject, level)[...])
        if truth.shape != prediction.level_probability.shape:
            raise ValueError(
                f"{store.url}: {subject} level {level} mask {truth.shape} does not match its grid "
                f"{prediction.level_probability.shape}"
            )
        level_pred = prediction.level_probability >= THRESHOLD
        level_scores = isles_metrics(level_pred, truth, spacing_of(prediction.level_affine))
    criterion = postprocess_scores(prediction.probability, case.mask, spacing)
    return SubjectScores(subject, native, level_scores, criterion)


@dataclass
class ValidationTotals:
    """Sums over validation subjects, to be added across workers, then turned into means."""

    native: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in METRIC_KEYS})
    level: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in METRIC_KEYS})
    postprocess: np.ndarray = field(default_factory=lambda: np.zeros(N_SCORES))
    count: float = 0.0
    level_count: float = 0.0

    def add(self, scores: SubjectScores) -> None:
        for k in METRIC_KEYS:
            self.native[k] += float(scores.native[k])
        if scores.level is not None:
            for k in METRIC_KEYS:
                self.level[k] += float(scores.level[k])
            self.level_count += 1.0
        self.postprocess = self.postprocess + scores.postprocess
        self.count += 1.0

    def vector(self) -> list[float]:
        """All sums as one flat list (for an all-reduce)."""
        return [
            *(self.native[k] for k in METRIC_KEYS), *(self.level[k] for k in METRIC_KEYS),
            *self.postprocess.tolist(), self.count, self.level_count,
        ]

    @classmethod
    def from_vector(cls, values: Sequence[float]) -> "ValidationTotals":
        n, c = len(METRIC_KEYS), N_SCORES
        values = [float(v) for v in values]
        return cls(
            native=dict(zip(METRIC_KEYS, values[:n])),
            level=dict(zip(METRIC_KEYS, values[n:2 * n])),
            postprocess=np.asarray(values[2 * n:2 * n + c]),
            count=values[2 * n + c],
            level_count=values[2 * n + c + 1],
        )

    def postprocessing(self) -> Postprocessing:
        """The threshold and removal size chosen on these subjects (0.5 and none without any)."""
        if self.count == 0:
            return Postprocessing(threshold=THRESHOLD)
        return choose_postprocessing(self.postprocess / self.count)

    def metrics(self) -> dict[str, float]:
        """Means: val_<metric> (native), val_level_<metric> (when scored), the removal choice."""
        n = max(1.0, self.count)
        out = {f"val_{k}": self.native[k] / n for k in METRIC_KEYS}
        if self.level_count:
            out.update({f"val_level_{k}": self.level[k] / self.level_count for k in METRIC_KEYS})
        chosen = self.postprocessing()
        out["postprocess_threshold"] = chosen.threshold
        out["postprocess_min_lesion_ml"] = chosen.min_lesion_ml
        out["val_postprocessed_score"] = postprocessed_score(self.postprocess / n, chosen)
        return out


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    store,
    subjects: Sequence[str],
    cfg: TrainConfig,
    device: torch.device,
    amp: bool,
    multiple: int,
) -> tuple[ValidationTotals, tuple[Any, ...] | None]:
    """Score `subjects` in their own space; the sums and an overlay example.

    Returns (totals, (subject, normalised native image, truth, mask) of the subject with
    the most lesion, truth or predicted, or None without subjects).

    Raises:
        ValueError: a subject's level mask does not match its level grid.
    """
    totals = ValidationTotals()
    example, example_voxels = None, -1
    for subject in subjects:
        case, prediction = predict_subject(
            model, store, subject, cfg, device=device, amp=amp, multiple=multiple,
            tta_axes=cfg.val_tta_axes,
        )
        totals.add(score_subject(store, subject, case, prediction, cfg.data.level))
        # The overlay should show a lesion: a held-out case without one draws empty slices.
        voxels = int(np.count_nonzero(case.mask)) + int(np.count_nonzero(prediction.mask))
        if voxels > example_voxels:
            image = normalise_case(case.image, case.attrs, store.normalization)
            example, example_voxels = (subject, image, case.mask, prediction.mask), voxels
    return totals, example
