"""Intensity normalisation: the one z-score used for training reads and for prediction.

The store keeps raw intensities and, per subject, the per-channel mean and standard
deviation inside the brain (`ingest.brain_stats`). Training (`StrokeStore.normalise`) and
prediction (`inference.normalise_case`) both call `normalise` here, so the two can never
drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["NORMALIZATIONS", "normalise", "zscore"]

NORMALIZATIONS = ("zscore", "none")


def zscore(image: np.ndarray, mean: Any, std: Any, in_place: bool = False) -> np.ndarray:
    """(image - mean) / std per channel of a (C, ...) image, as float32.

    Args:
        image: a (C, X, Y, Z) array (or any (C, ...) shape).
        mean: C per-channel means.
        std: C per-channel standard deviations.
        in_place: overwrite `image` (a float32 array the caller owns) instead of allocating:
            patches read straight from the store are normalised this way (docs/sampling.md).
    """
    image = np.asarray(image, dtype=np.float32)
    shape = (-1,) + (1,) * (image.ndim - 1)
    mean = np.asarray(mean, np.float32).reshape(shape)
    std = np.asarray(std, np.float32).reshape(shape)
    # The float32 subtract-then-divide of (image - mean) / std, into one array: the same
    # numbers whether in place or not.
    out = np.subtract(image, mean, out=image if in_place else None, dtype=np.float32)
    return np.divide(out, std, out=out)


def normalise(image: np.ndarray, normalization: str, stats: Mapping[str, Any] | None,
              in_place: bool = False) -> np.ndarray:
    """Apply `normalization` to a (C, ...) image with a subject's own statistics.

    Args:
        image: raw intensities, (C, ...).
        normalization: "zscore" or "none".
        stats: the subject's {"mean": [...], "std": [...]} (the store's `norm` attribute).
        in_place: overwrite a float32 `image` the caller owns instead of allocating.

    Raises:
        ValueError: an unknown normalisation, or zscore without statistics.
    """
    if normalization == "none":
        return np.asarray(image).astype(np.float32, copy=False)
    if normalization != "zscore":
        raise ValueError(f"unknown normalization {normalization!r} ({', '.join(NORMALIZATIONS)})")
    if not stats:
        raise ValueError("case has no 'norm' statistics in its attrs; cannot z-score it")
    return zscore(image, stats["mean"], stats["std"], in_place=in_place)
