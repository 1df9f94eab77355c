"""Training patches from a stroke-ray store: subject split, patch samplers, the patch stream.

A sampler turns one subject's summed-volume table (`integral.integral_volume` of its mask)
into a `PositionSet` once, and the set then yields patch corners in O(1) per draw. The
threshold sampler enumerates *all* corners that pass the rejection test at once (eight
look-ups per corner through `integral.box_sums`) and draws uniformly among them, which is
the same distribution as rejection sampling with uniform proposals but never loops, whatever
the threshold. See docs/sampling.md for the exact semantics and the fallbacks.

`PatchDataset` is an endless `IterableDataset`: every Ray Train rank and every DataLoader
worker draws its own reproducible stream, reads a subject's level arrays once per visit into
a small per-worker cache bounded in bytes, and cuts `samples_per_volume` patches from RAM.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stroke_ray.config import DataConfig
from stroke_ray.integral import box_sums, integral_volume

__all__ = [
    "ACCEPTED",
    "EMPTY_MASK",
    "FOREGROUND",
    "INFEASIBLE",
    "UNIFORM",
    "build_sampler",
    "cut_patch",
    "make_loader",
    "split_manifest",
    "split_subjects",
    "ForegroundSampler",
    "PatchDataset",
    "PositionSet",
    "ThresholdSampler",
    "UniformSampler",
]

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]

# Why a subject's corners are drawn from where they are (stats() counts these).
ACCEPTED = "accepted"  # threshold test passed somewhere: uniform over the accepted corners
UNIFORM = "uniform"  # uniform sampler
EMPTY_MASK = "empty_mask"  # threshold/foreground sampler, no lesion: uniform fallback
INFEASIBLE = "infeasible"  # no corner passes: the corners with the most lesion voxels
FOREGROUND = "foreground"  # foreground sampler with lesion voxels


# --- split ---------------------------------------------------------------------------------
def _subject_key(subject: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{subject}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_subjects(
    subjects: list[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic, disjoint train/validation split (both returned sorted).

    Subjects are ranked by a hash of (seed, subject id) and the lowest-ranked
    round(val_fraction * n) go to validation (at least one of each when n >= 2). A subject's
    rank does not depend on the others, so adding subjects moves few of the existing ones.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(subjects))
    if len(unique) != len(subjects):
        raise ValueError("split_subjects: subject ids must be unique")
    n = len(unique)
    if n < 2:
        return unique, []
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    ranked = sorted(unique, key=lambda s: (_subject_key(s, seed), s))
    val = sorted(ranked[:n_val])
    train = sorted(ranked[n_val:])
    return train, val


def split_manifest(train: list[str], val: list[str], seed: int | None = None) -> dict:
    """A JSON-able record of a split, for the run's tracking (params/artifacts)."""
    digest = hashlib.sha256(
        ("train:" + ",".join(sorted(train)) + ";val:" + ",".join(sorted(val))).encode()
    ).hexdigest()
    manifest = {
        "method": "blake2b(seed:subject) rank",
        "num_train": len(train),
        "num_val": len(val),
        "train": sorted(train),
        "val": sorted(val),
        "sha256": digest,
    }
    if seed is not None:
        manifest["seed"] = int(seed)
    return manifest


# --- samplers ------------------------------------------------------------------------------
def _as_triple(patch: int | Triple) -> Triple:
    if isinstance(patch, (int, np.integer)):
        return (int(patch),) * 3
    return tuple(int(p) for p in patch)  # type: ignore[return-value]


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
    lesion_voxels: np.ndarray | None = None  # (L, 3) voxel coords, foreground sampler only
    fraction: float = 0.0  # foreground sampler: probability of a lesion-centred patch

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
        if self.lesion_voxels is not None and rng.random() < self.fraction:
            voxel = self.lesion_voxels[rng.integers(len(self.lesion_voxels))]
            # The lesion voxel lands anywhere inside the patch, then the corner is clipped
            # into the valid range, which keeps the voxel inside (see docs/sampling.md).
            offset = rng.integers(0, self.patch)
            lo = np.asarray(self.origin)
            hi = lo + np.asarray(self.grid) - 1
            return tuple(int(c) for c in np.clip(voxel - offset, lo, hi))  # type: ignore[return-value]
        if self.corners is None:
            pos = rng.integers(0, self.grid)
            return tuple(int(o + p) for o, p in zip(self.origin, pos))  # type: ignore[return-value]
        flat = int(self.corners[rng.integers(self.corners.size)])
        return tuple(int(o + p) for o, p in zip(self.origin, np.unravel_index(flat, self.grid)))  # type: ignore[return-value]


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
        patch = _as_triple(patch)
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
        patch = _as_triple(patch)
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
        patch = _as_triple(patch)
        table = np.asarray(table)
        shape, origin, grid = _frame(table, patch)
        if int(table[-1, -1, -1]) == 0:
            return PositionSet(shape, patch, origin, grid, EMPTY_MASK)
        mask = box_sums(table, (1, 1, 1))  # the mask back from its table: exact
        voxels = np.argwhere(mask > 0).astype(np.int32)
        return PositionSet(
            shape, patch, origin, grid, FOREGROUND, lesion_voxels=voxels, fraction=self.fraction
        )


def build_sampler(name: str, threshold: float = 0.2, foreground_fraction: float = 0.33):
    """A sampler from its config name (uniform | threshold | threshold_cube | foreground)."""
    if name == "uniform":
        return UniformSampler()
    if name == "threshold":
        return ThresholdSampler(threshold, reference="subject")
    if name == "threshold_cube":
        return ThresholdSampler(threshold, reference="cube")
    if name == "foreground":
        return ForegroundSampler(foreground_fraction)
    raise ValueError(f"unknown sampler {name!r} (uniform, threshold, threshold_cube, foreground)")


# --- patch cutting -------------------------------------------------------------------------
def cut_patch(volume: np.ndarray, corner: Triple, patch: Triple) -> np.ndarray:
    """volume[..., x:x+N, y:y+N, z:z+N] as a new contiguous array, zero outside the volume."""
    spatial = volume.shape[-3:]
    if all(c >= 0 and c + n <= s for c, n, s in zip(corner, patch, spatial)):
        x, y, z = corner
        return np.ascontiguousarray(volume[..., x : x + patch[0], y : y + patch[1], z : z + patch[2]])
    out = np.zeros(volume.shape[:-3] + tuple(patch), dtype=volume.dtype)
    src, dst = [], []
    for c, n, s in zip(corner, patch, spatial):
        lo, hi = max(c, 0), min(c + n, s)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - c, max(lo, hi) - c))
    out[(..., *dst)] = volume[(..., *src)]
    return out


class _ByteLRU:
    """Least-recently-used cache bounded by the total bytes of its numpy values."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[np.ndarray, ...]] = OrderedDict()
        self._bytes = 0

    def get(self, key: str):
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, value: tuple[np.ndarray, ...]) -> None:
        size = sum(v.nbytes for v in value)
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= sum(v.nbytes for v in old)


# --- the patch stream ----------------------------------------------------------------------
class PatchDataset(IterableDataset):
    """Endless stream of {"image": (C,N,N,N) float, "mask": (1,N,N,N) float, "subject": str}.

    The stream of rank r and DataLoader worker w is seeded by SeedSequence([seed, r, w]):
    reproducible, and distinct across ranks and workers.
    Each pass visits the subjects in a fresh random order and cuts `samples_per_volume`
    patches per visit. `cache_bytes` bounds the per-worker cache of whole level arrays
    (normalised image + mask); 0 reads every patch straight from Zarr instead.
    """

    def __init__(
        self,
        store: str,
        subjects: list[str],
        level: str,
        patch_size: int,
        sampler: str = "threshold",
        threshold: float = 0.2,
        foreground_fraction: float = 0.33,
        samples_per_volume: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        normalise: bool = True,
        cache_bytes: int = 2**30,
        storage_options: dict | None = None,
    ):
        super().__init__()
        if not subjects:
            raise ValueError("PatchDataset needs at least one subject")
        if samples_per_volume < 1:
            raise ValueError("samples_per_volume must be >= 1")
        self.store_url = store
        self.subjects = list(subjects)
        self.level = str(level)
        self.patch = _as_triple(patch_size)
        self.sampler_name = sampler
        self.sampler = build_sampler(sampler, threshold, foreground_fraction)
        self.samples_per_volume = int(samples_per_volume)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.normalise = normalise
        self.cache_bytes = int(cache_bytes)
        self.storage_options = storage_options
        self._store = None
        self._volumes: _ByteLRU | None = None
        self._positions: dict[str, PositionSet] = {}
        self._draws: Counter = Counter()
        self._warned: set[str] = set()

    def __getstate__(self):
        # Workers re-open the store and start with empty caches.
        state = dict(self.__dict__)
        state.update(_store=None, _volumes=None, _positions={}, _draws=Counter(), _warned=set())
        return state

    @property
    def store(self):
        if self._store is None:
            from stroke_ray.store import StrokeStore

            self._store = StrokeStore.open(self.store_url, storage_options=self.storage_options)
        return self._store

    # per-subject state, computed once per worker
    def positions(self, subject: str) -> PositionSet:
        """The subject's corner set for this dataset's sampler and patch size (cached)."""
        pos = self._positions.get(subject)
        if pos is None:
            try:
                table = self.store.mask_integral(subject, self.level)[...]
            except KeyError:
                table = integral_volume(np.asarray(self.store.mask(subject, self.level)[...]))
            pos = self.sampler.positions(table, self.patch)
            self._positions[subject] = pos
            if pos.reason in (EMPTY_MASK, INFEASIBLE) and subject not in self._warned:
                self._warned.add(subject)
                log.info(
                    "%s (level %s): %s sampler fallback %s over %d corners",
                    subject, self.level, self.sampler_name, pos.reason, pos.size,
                )
        return pos

    def _volume(self, subject: str) -> tuple[np.ndarray, np.ndarray]:
        cached = self._volumes.get(subject) if self._volumes is not None else None
        if cached is not None:
            return cached  # type: ignore[return-value]
        image = np.asarray(self.store.image(subject, self.level)[...], dtype=np.float32)
        if self.normalise:
            image = self.store.normalise(subject, image)
        mask = np.asarray(self.store.mask(subject, self.level)[...], dtype=np.uint8)
        if self._volumes is not None:
            self._volumes.put(subject, (image, mask))
        return image, mask

    def _read_patch(self, subject: str, corner: Triple, volume=None) -> tuple[np.ndarray, np.ndarray]:
        if volume is not None:
            image, mask = volume
            return cut_patch(image, corner, self.patch), cut_patch(mask, corner, self.patch)
        # Direct Zarr reads of the patch's region only (cache_bytes=0).
        shape = self.store.mask(subject, self.level).shape
        src = tuple(slice(max(c, 0), min(c + n, s)) for c, n, s in zip(corner, self.patch, shape))
        image = np.asarray(self.store.image(subject, self.level)[(slice(None), *src)], np.float32)
        if self.normalise:
            image = self.store.normalise(subject, image)
        mask = np.asarray(self.store.mask(subject, self.level)[src], np.uint8)
        inner = tuple(max(-c, 0) for c in corner)
        if image.shape[-3:] != self.patch:
            image = cut_patch(image, tuple(-i for i in inner), self.patch)  # type: ignore[arg-type]
            mask = cut_patch(mask, tuple(-i for i in inner), self.patch)  # type: ignore[arg-type]
        return image, mask

    def stream_seed(self) -> np.random.SeedSequence:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return np.random.SeedSequence([self.seed, self.rank, worker])

    def __iter__(self) -> Iterator[dict]:
        if self._volumes is None and self.cache_bytes > 0:
            self._volumes = _ByteLRU(self.cache_bytes)
        rng = np.random.default_rng(self.stream_seed())
        while True:
            for index in rng.permutation(len(self.subjects)):
                subject = self.subjects[int(index)]
                pos = self.positions(subject)
                # Read once per visit (from the cache when it holds the subject).
                volume = self._volume(subject) if self.cache_bytes > 0 else None
                for _ in range(self.samples_per_volume):
                    corner = pos.sample(rng)
                    self._draws[pos.reason] += 1
                    image, mask = self._read_patch(subject, corner, volume)
                    yield {
                        "image": torch.from_numpy(image),
                        "mask": torch.from_numpy(mask[None].astype(np.float32)),
                        "subject": subject,
                    }

    def stats(self) -> dict[str, dict[str, int]]:
        """Counts per reason: "subjects" (over all subjects of the dataset, computed here)
        and "draws" (patches drawn by this process; DataLoader workers keep their own)."""
        subjects = Counter(self.positions(s).reason for s in self.subjects)
        return {"subjects": dict(subjects), "draws": dict(self._draws)}


def make_loader(
    cfg: DataConfig,
    subjects: list[str],
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    **dataset_kwargs,
) -> DataLoader:
    """DataLoader over a `PatchDataset` built from a DataConfig (workers seed themselves)."""
    dataset = PatchDataset(
        cfg.store,
        subjects,
        level=cfg.level,
        patch_size=cfg.patch_size,
        sampler=cfg.sampler,
        threshold=cfg.threshold,
        foreground_fraction=cfg.foreground_fraction,
        samples_per_volume=cfg.samples_per_volume,
        seed=seed,
        rank=rank,
        world_size=world_size,
        **dataset_kwargs,
    )
    workers = int(cfg.loader_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
