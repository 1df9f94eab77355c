"""Summed-volume tables (3D integral images): the sum of a mask over any box in O(1).

Threshold sampling needs, for every candidate patch corner, the number of lesion voxels in
the patch. With the table `S` (one voxel larger than the mask on each axis, zero first
plane) that count is eight look-ups, and for all corners at once it is a vectorised
inclusion-exclusion over shifted views of `S`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["box_sums", "integral_volume"]


def integral_volume(mask: np.ndarray) -> np.ndarray:
    """Return S with S[i, j, k] = mask[:i, :j, :k].sum(); shape is mask.shape + 1 per axis."""
    if mask.ndim != 3:
        raise ValueError(f"integral_volume expects a 3D mask, got shape {mask.shape}")
    table = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.int64)
    table[1:, 1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    dtype = np.int32 if table[-1, -1, -1] < np.iinfo(np.int32).max else np.int64
    return table.astype(dtype, copy=False)


def box_sums(table: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Sums of the mask over every box of `size` whose corner lies inside the volume.

    Returns an array of shape (X - sx + 1, Y - sy + 1, Z - sz + 1): entry [i, j, k] is the
    sum over mask[i:i+sx, j:j+sy, k:k+sz]. Axes where the box is larger than the volume
    give an empty result; the caller decides how to pad.
    """
    sx, sy, sz = size
    t = np.asarray(table, dtype=np.int64)
    return (
        t[sx:, sy:, sz:]
        - t[:-sx, sy:, sz:]
        - t[sx:, :-sy, sz:]
        - t[sx:, sy:, :-sz]
        + t[:-sx, :-sy, sz:]
        + t[:-sx, sy:, :-sz]
        + t[sx:, :-sy, :-sz]
        - t[:-sx, :-sy, :-sz]
    )
