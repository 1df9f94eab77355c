"""The training patch stream: patches cut from a stroke-ray store, endlessly.

`PatchDataset` is an endless `IterableDataset`: every Ray Train rank and every DataLoader
worker draws its own reproducible stream, reads a subject's level arrays once per visit into
a small per-worker cache bounded in bytes, and cuts `samples_per_volume` patches from RAM.
Where patches come from is the sampler's business (`stroke_ray.samplers`); which subjects
train is the split's (`stroke_ray.splits`).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stroke_ray.config import DataConfig
from stroke_ray.integral import integral_volume
from stroke_ray.samplers import (
    EMPTY_MASK,
    INFEASIBLE,
    PositionSet,
    Triple,
    as_triple,
    build_sampler,
)

__all__ = ["PatchDataset", "make_loader", "cut_patch"]


log = logging.getLogger(__name__)


# --- patch cutting -------------------------------------------------------------------------
def cut_patch(volume: np.ndarray, corner: Triple, patch: Triple, fill: np.ndarray | None = None) -> np.ndarray:
    """volume[..., x:x+N, y:y+N, z:z+N] as a new contiguous array.

    Outside the volume the patch holds `fill`: one value per leading channel of a (C, ...)
    volume (a normalised image's air value), or 0 when None.
    """
    spatial = volume.shape[-3:]
    if all(c >= 0 and c + n <= s for c, n, s in zip(corner, patch, spatial)):
        x, y, z = corner
        return np.ascontiguousarray(volume[..., x : x + patch[0], y : y + patch[1], z : z + patch[2]])
    out = np.zeros(volume.shape[:-3] + tuple(patch), dtype=volume.dtype)
    if fill is not None:
        out[...] = np.asarray(fill, dtype=volume.dtype).reshape((-1,) + (1,) * 3)
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
    """Endless stream of {"image": (C,X,Y,Z) float, "mask": (1,X,Y,Z) float, "air": (C,) float,
    "subject": str}, where (X, Y, Z) is the patch size and "air" each channel's padding value.

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
        patch_size: int | Triple,
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
        self.patch = as_triple(patch_size)
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

    def air(self, subject: str) -> np.ndarray:
        """(C,) float32: each channel's value for raw 0 (air) as the network sees it.

        Patches reaching beyond the volume are padded with it, so the network sees air
        there, as at the edge of the field of view, not the brain's mean intensity."""
        channels = len(self.store.modalities)
        zeros = np.zeros((channels, 1, 1, 1), np.float32)
        return (self.store.normalise(subject, zeros) if self.normalise else zeros).reshape(-1)

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

    def _read_patch(
        self, subject: str, corner: Triple, air: np.ndarray, volume=None
    ) -> tuple[np.ndarray, np.ndarray]:
        if volume is not None:
            image, mask = volume
            return cut_patch(image, corner, self.patch, fill=air), cut_patch(mask, corner, self.patch)
        # Direct Zarr reads of the patch's region only (cache_bytes=0); raw 0 pads, then
        # normalising turns it into air.
        shape = self.store.mask(subject, self.level).shape
        src = tuple(slice(max(c, 0), min(c + n, s)) for c, n, s in zip(corner, self.patch, shape))
        image = np.asarray(self.store.image(subject, self.level)[(slice(None), *src)], np.float32)
        mask = np.asarray(self.store.mask(subject, self.level)[src], np.uint8)
        inner = tuple(max(-c, 0) for c in corner)
        if image.shape[-3:] != self.patch:
            image = cut_patch(image, tuple(-i for i in inner), self.patch)  # type: ignore[arg-type]
            mask = cut_patch(mask, tuple(-i for i in inner), self.patch)  # type: ignore[arg-type]
        if self.normalise:
            image = self.store.normalise(subject, image)
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
                air = self.air(subject)
                for _ in range(self.samples_per_volume):
                    corner = pos.sample(rng)
                    self._draws[pos.reason] += 1
                    image, mask = self._read_patch(subject, corner, air, volume)
                    yield {
                        "image": torch.from_numpy(image),
                        "mask": torch.from_numpy(mask[None].astype(np.float32)),
                        "air": torch.from_numpy(air),
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
        patch_size=cfg.patch,
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
