"""A checkpoint's held-out score on given subjects, measured the way training measures it.

Promotion (`promotion.promote`) needs the current champion's score on a challenger's
validation subjects when the two were validated on different ones. This rebuilds the
checkpoint's model and runs the same `validation.validate` (each case predicted at the
checkpoint's own training level and scored on its native grid, ISLES'22 metrics) on those
subjects of the challenger's store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from stroke_ray.checkpoint import load_checkpoint
from stroke_ray.errors import StrokeRayError
from stroke_ray.metrics import METRIC_KEYS
from stroke_ray.models import size_multiple
from stroke_ray.store import StrokeStore
from stroke_ray.validation import validate

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: str | Path, store_path: str, subjects: Sequence[str], metric: str,
                        device: str = "cpu") -> float:
    """`metric` (e.g. "val_dice") of `checkpoint` averaged over `subjects` of the store.

    Args:
        checkpoint: a checkpoint file or folder.
        store_path: the Zarr store holding the subjects at the checkpoint's training level.
        subjects: the held-out subjects to score.
        metric: a `val_<key>` name with <key> in metrics.METRIC_KEYS.
        device: where to run the model.

    Raises:
        StrokeRayError: an unknown metric, no subjects, a store without the checkpoint's
            level, modalities or one of the subjects.
    """
    key = metric.removeprefix("val_")
    if key not in METRIC_KEYS:
        raise StrokeRayError(f"{metric}: not a held-out metric (val_ + one of {', '.join(METRIC_KEYS)})")
    if not subjects:
        raise StrokeRayError(f"{store_path}: no held-out subjects to evaluate on")
    loaded = load_checkpoint(checkpoint, device=device)
    store = StrokeStore.open(store_path)
    level = loaded.config.data.level
    if level not in store.levels:
        raise StrokeRayError(f"{store_path}: has no level {level!r}, which {checkpoint} was trained on")
    if list(store.modalities) != list(loaded.modalities):
        raise StrokeRayError(f"{store_path}: holds {store.modalities}, {checkpoint} needs {loaded.modalities}")
    missing = sorted(set(subjects) - set(store.subjects()))
    if missing:
        raise StrokeRayError(f"{store_path}: has no subject {missing[0]}")
    totals, _ = validate(loaded.model, store, list(subjects), loaded.config, torch.device(device), False,
                         size_multiple(loaded.config.model))
    return totals.metrics()[f"val_{key}"]
