"""Patch samplers: where in a subject the next training patch is cut.

A sampler turns one subject's summed-volume table (`integral.integral_volume` of its mask)
into a `PositionSet` once, and the set then yields patch corners in O(1) per draw. The
threshold sampler enumerates *all* corners that pass the rejection test at once (eight
look-ups per corner through `integral.box_sums`) and draws uniformly among them, which is
the same distribution as rejection sampling with uniform proposals but never loops, whatever
the threshold. See docs/sampling.md for the exact semantics and the fallbacks.

Every sampler follows the `Sampler` protocol: a `name` and `positions(table, patch)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np

from stroke_ray.integral import box_sums
from stroke_ray.metrics import label_lesions  # the lesion definition the scores use

__all__ = [
    "Triple",
    "Sampler",
    "PositionSet",
    "UniformSampler",
    "ThresholdSampler",
    "ForegroundSampler",
    "LesionSampler",
    "build_sampler",
    "as_triple",
    "ACCEPTED",
    "UNIFORM",
    "EMPTY_MASK",
    "INFEASIBLE",
    "FOREGROUND",
]

Triple = tuple[int, int, int]

# Why a subject's corners are drawn from where they are (stats() counts these).
ACCEPTED = "accepted"  # threshold test passed somewhere: uniform over the accepted corners
UNIFORM = "uniform"  # uniform sampler
EMPTY_MASK = "empty_mask"  # threshold/foreground sampler, no lesion: uniform fallback
INFEASIBLE = "infeasible"  # no corner passes: the corners with the most lesion voxels
FOREGROUND = "foreground"  # foreground (or lesion) sampler with lesion voxels


def as_triple(patch: int | Triple) -> Triple:
    if isinstance(patch, (int, np.integer)):
        return (int(patch),) * 3
    return tuple(int(p) for p in patch)  # type: ignore[return-value]


@runtime_checkable
class Sampler(Protocol):
    """Where patches of a subject may be cut, from its summed-volume mask table."""

    name: str

    def positions(self, table: np.ndarray, patch: int | Triple) -> "PositionSet":
        """The subject's corner set for patches of size `patch`."""
        ...


@dataclass
class PositionSet:
    """Where one subject's patch corners may be drawn from; `sample` is O(1).

    Corners live on a grid starting at `origin` (negative on axes where the volume is
    shorter than the patch: the patch is then zero-padded) with `grid` positions per axis.
    `corners` holds flat indices into that grid, or None for all of them.
    """

    shape: Triple
    patch: Triple
    origin: Triple
    grid: Triple
    reason: str
    corners: np.ndarray | None = None
    lesion_voxels: np.ndarray | None = None  # (L, 3) voxel coords, foreground/lesion samplers only
    fraction: float = 0.0  # foreground/lesion samplers: probability of a lesion-holding patch
    # lesion sampler: lesion_voxels grouped by lesion, lesion k owning rows
    # starts[k]:starts[k+1]; None = every lesion voxel equally likely (foreground sampler)
    lesion_starts: np.ndarray | None = None
    # (K, 3) voxels of lesion look-alikes (hard negatives, `with_lookalikes`) and the share
    # of all patches centred on one of them
    lookalikes: np.ndarray | None = None
    lookalike_fraction: float = 0.0

    def with_lookalikes(self, voxels: np.ndarray | None, fraction: float) -> "PositionSet":
        """A copy of this set with `fraction` of its patches centred on one of `voxels`
        (drawn uniformly), taken from the uniform share; no look-alikes (None or empty)
        returns the set itself."""
        if voxels is None or len(voxels) == 0 or fraction <= 0.0:
            return self
        if self.lesion_voxels is not None and self.fraction + fraction > 1.0:
            raise ValueError(f"lesion share {self.fraction} + look-alike share {fraction} exceeds 1")
        return replace(self, lookalikes=np.asarray(voxels, dtype=np.int64).reshape(-1, 3),
                       lookalike_fraction=float(fraction))

    @property
    def size(self) -> int:
        """Number of distinct corners a uniform draw ranges over."""
        return int(np.prod(self.grid)) if self.corners is None else int(self.corners.size)

    def all_corners(self) -> np.ndarray:
        """(M, 3) array of every corner the set draws from (foreground: the uniform part)."""
        flat = np.arange(int(np.prod(self.grid))) if self.corners is None else self.corners
        return np.stack(np.unravel_index(flat, self.grid), axis=1) + np.asarray(self.origin)

    def sample(self, rng: np.random.Generator) -> Triple:
        """One patch corner (x, y, z) in voxel coordinates of the volume."""
        lesion_share = self.fraction if self.lesion_voxels is not None else 0.0
        if self.lesion_voxels is not None and rng.random() < self.fraction:
            if self.lesion_starts is None:
                voxel = self.lesion_voxels[rng.integers(len(self.lesion_voxels))]
            else:  # a lesion first, every lesion alike, then one of its voxels
                k = int(rng.integers(len(self.lesion_starts) - 1))
                voxel = self.lesion_voxels[rng.integers(self.lesion_starts[k], self.lesion_starts[k + 1])]
            return self._around(voxel, rng)
        # Of the patches not on a lesion, the share that makes `lookalike_fraction` of all.
        if self.lookalikes is not None and rng.random() < self.lookalike_fraction / (1.0 - lesion_share):
            return self._around(self.lookalikes[rng.integers(len(self.lookalikes))], rng)
        if self.corners is None:
            pos = rng.integers(0, self.grid)
            return tuple(int(o + p) for o, p in zip(self.origin, pos))  # type: ignore[return-value]
        flat = int(self.corners[rng.integers(self.corners.size)])
        return tuple(int(o + p) for o, p in zip(self.origin, np.unravel_index(flat, self.grid)))  # type: ignore[return-value]

    def _around(self, voxel: np.ndarray, rng: np.random.Generator) -> Triple:
        """A corner whose patch holds `voxel` anywhere inside: a random offset, then the
        corner clipped into the valid range, which keeps the voxel inside (docs/sampling.md)."""
        offset = rng.integers(0, self.patch)
        lo = np.asarray(self.origin)
        hi = lo + np.asarray(self.grid) - 1
        return tuple(int(c) for c in np.clip(voxel - offset, lo, hi))  # type: ignore[return-value]


def _frame(table: np.ndarray, patch: Triple) -> tuple[Triple, Triple, Triple]:
    shape = tuple(int(s) - 1 for s in table.shape)
    origin = tuple(min(0, s - n) for s, n in zip(shape, patch))
    grid = tuple(abs(s - n) + 1 for s, n in zip(shape, patch))
    return shape, origin, grid  # type: ignore[return-value]


def _padded_box_sums(table: np.ndarray, patch: Triple) -> np.ndarray:
    """Lesion count of every corner of the (possibly padded) corner grid.

    Zero-padding the mask by `pad` voxels on both sides of a short axis is edge-padding its
    summed-volume table (the first plane is all zeros, the last is the running total), so
    the stored table is reused as is.
    """
    shape = [int(s) - 1 for s in table.shape]
    pad = [(max(0, n - s),) * 2 for s, n in zip(shape, patch)]
    if any(p[0] for p in pad):
        table = np.pad(np.asarray(table), pad, mode="edge")
    return box_sums(table, patch)


class UniformSampler:
    """Every corner equally likely: corner in [0, dim - N] per axis ([dim - N, 0] if dim < N)."""

    name = "uniform"

    def positions(self, table: np.ndarray, patch: int | Triple) -> PositionSet:
        patch = as_triple(patch)
        shape, origin, grid = _frame(table, patch)
        return PositionSet(shape, patch, origin, grid, UNIFORM)


class ThresholdSampler:
    """Rejection sampling's distribution without the rejections.

    A cube is kept when count(lesion in cube) / reference > threshold (strict), where the
    reference is the subject's total lesion volume (`reference="subject"`) or the cube's
    volume N^3 (`reference="cube"`). Corners are drawn uniformly among all kept cubes.
    Fallbacks: empty mask -> uniform corners; no cube passes -> uniform among the corners
    holding the most lesion voxels (the best fraction reachable).
    """

    name = "threshold"

    def __init__(self, threshold: float = 0.2, reference: str = "subject"):
        if reference not in ("subject", "cube"):
            raise ValueError(f"reference must be 'subject' or 'cube', got {reference!r}")
        self.threshold = float(threshold)
        self.reference = reference

    def positions(self, table: np.ndarray, patch: int | Triple) -> PositionSet:
        patch = as_triple(patch)
        table = np.asarray(table)
        shape, origin, grid = _frame(table, patch)
        total = int(table[-1, -1, -1])
        if total == 0:
            return PositionSet(shape, patch, origin, grid, EMPTY_MASK)
        counts = _padded_box_sums(table, patch)
        denominator = total if self.reference == "subject" else int(np.prod(patch))
        kept = np.flatnonzero(counts / denominator > self.threshold)
        if kept.size:
            return PositionSet(shape, patch, origin, grid, ACCEPTED, corners=kept)
        best = np.flatnonzero(counts == counts.max())
        return PositionSet(shape, patch, origin, grid, INFEASIBLE, corners=best)


class ForegroundSampler:
    """nnU-Net style: with probability `fraction` a patch holding a random lesion voxel
    (anywhere inside the patch), otherwise a uniform corner. Empty mask -> uniform."""

    name = "foreground"

    def __init__(self, fraction: float = 0.33):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.fraction = float(fraction)

    def positions(self, table: np.ndarray, patch: int | Triple) -> PositionSet:
        patch = as_triple(patch)
        table = np.asarray(table)
        shape, origin, grid = _frame(table, patch)
        if int(table[-1, -1, -1]) == 0:
            return PositionSet(shape, patch, origin, grid, EMPTY_MASK)
        mask = box_sums(table, (1, 1, 1))  # the mask back from its table: exact
        voxels = np.argwhere(mask > 0).astype(np.int32)
        return PositionSet(
            shape, patch, origin, grid, FOREGROUND, lesion_voxels=voxels, fraction=self.fraction
        )


class LesionSampler(ForegroundSampler):
    """The foreground sampler with every lesion equally likely, whatever its size.

    With probability `fraction` a patch holds a voxel of one lesion (a 26-connected
    component of the mask, as the metrics count lesions) drawn uniformly among the
    subject's lesions, then a voxel of it; otherwise a uniform corner. The foreground
    sampler draws lesion voxels uniformly, so an 80 ml infarct beside three 0.05 ml
    emboli gets 99.8 % of the lesion patches; here each of the four gets a quarter, and
    the network sees the few-voxel lesions it is otherwise last to learn. Empty mask ->
    uniform.
    """

    name = "lesion"

    def positions(self, table: np.ndarray, patch: int | Triple) -> PositionSet:
        pos = super().positions(table, patch)
        if pos.lesion_voxels is None:
            return pos
        mask = np.zeros(pos.shape, bool)
        mask[tuple(pos.lesion_voxels.T)] = True
        labels, n = label_lesions(mask)
        ids = labels[tuple(pos.lesion_voxels.T)]
        order = np.argsort(ids, kind="stable")
        pos.lesion_voxels = pos.lesion_voxels[order]
        pos.lesion_starts = np.searchsorted(ids[order], np.arange(1, n + 2)).astype(np.int64)
        return pos


def build_sampler(name: str, threshold: float = 0.2, foreground_fraction: float = 0.33):
    """A sampler from its config name (uniform | threshold | threshold_cube | foreground | lesion)."""
    if name == "uniform":
        return UniformSampler()
    if name == "threshold":
        return ThresholdSampler(threshold, reference="subject")
    if name == "threshold_cube":
        return ThresholdSampler(threshold, reference="cube")
    if name == "foreground":
        return ForegroundSampler(foreground_fraction)
    if name == "lesion":
        return LesionSampler(foreground_fraction)
    raise ValueError(f"unknown sampler {name!r} (uniform, threshold, threshold_cube, foreground, lesion)")
