"""The training patch stream: patches cut from a stroke-ray store, endlessly.

`PatchDataset` is an endless `IterableDataset`: every Ray Train rank and every DataLoader
worker draws its own reproducible stream from its own shard of the subjects
(`shard_subjects`) and cuts `samples_per_volume` patches per visit of a subject: from RAM
when the per-worker cache (`subject_cache`, the hottest subjects within a byte budget)
holds the subject, else straight from the chunks those patches touch (`chunk_reader`).
Where patches come from is the sampler's business (`stroke_ray.samplers`); which subjects
train is the split's (`stroke_ray.splits`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stroke_ray.chunk_reader import ChunkReader
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
from stroke_ray.store import StrokeStore
from stroke_ray.subject_cache import SubjectCache

__all__ = ["PatchDataset", "make_loader", "cut_patch", "shard_subjects"]


log = logging.getLogger(__name__)


# --- which subjects a stream draws from ----------------------------------------------------
def shard_subjects(subjects: list[str], rank: int, world_size: int, worker: int = 0,
                   num_workers: int = 1) -> list[str]:
    """The subjects stream (rank, worker) draws from: disjoint shards whenever possible.

    Stream `rank * num_workers + worker` of `world_size * num_workers` takes every n-th
    subject of the (sorted) list, so no two streams share a subject and each shard differs
    in size by at most one. With fewer subjects than streams, the shards are per rank (the
    DataLoader workers of a rank share its shard and differ by seed); with fewer subjects
    than ranks every stream takes them all (still distinct: every stream has its own seed).

    Args:
        subjects: the training subjects (every rank must pass the same list).
        rank, world_size: this Ray Train worker and how many there are.
        worker, num_workers: this DataLoader worker of the rank and how many there are.
    """
    streams = world_size * num_workers
    if len(subjects) >= streams:
        return list(subjects)[rank * num_workers + worker :: streams]
    if len(subjects) >= world_size:
        return list(subjects)[rank::world_size]
    return list(subjects)


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


# --- the patch stream ----------------------------------------------------------------------
class PatchDataset(IterableDataset):
    """Endless stream of {"image": (C,X,Y,Z) float, "mask": (1,X,Y,Z) float, "air": (C,) float,
    "subject": str}, where (X, Y, Z) is the patch size and "air" each channel's padding value.

    The stream of rank r and DataLoader worker w is seeded by SeedSequence([seed, r, w])
    and draws from its own shard of `subjects` (`shard_subjects`): reproducible, and two
    ranks never draw the same stream. Each pass visits the shard's subjects in a fresh
    random order and cuts `samples_per_volume` patches per visit. `cache_bytes` bounds the
    per-worker cache of whole level arrays (normalised image + mask, `SubjectCache`);
    subjects outside it, and all of them with 0, are read straight from their chunks, each
    chunk a visit's patches touch fetched and decoded once per visit.
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
        lookalike_fraction: float = 0.0,
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
        self.lookalike_fraction = float(lookalike_fraction)
        self.samples_per_volume = int(samples_per_volume)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.normalise = normalise
        self.cache_bytes = int(cache_bytes)
        self.storage_options = storage_options
        self._store = None
        self._volumes: SubjectCache | None = None
        self._readers: dict[str, tuple[ChunkReader, ChunkReader]] = {}
        self._pools: dict[tuple, list[np.ndarray]] = {}  # decode buffers per chunk size, reused
        self._positions: dict[str, PositionSet] = {}
        self._draws: Counter = Counter()
        self._warned: set[str] = set()
        self._warned_lookalikes = False

    def __getstate__(self):
        # Workers re-open the store and start with empty caches.
        state = dict(self.__dict__)
        state.update(_store=None, _volumes=None, _readers={}, _pools={}, _positions={}, _draws=Counter(), _warned=set(),
                     _warned_lookalikes=False)
        return state

    @property
    def store(self):
        if self._store is None:
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
            if self.lookalike_fraction > 0:
                pos = pos.with_lookalikes(self._lookalikes(subject), self.lookalike_fraction)
            self._positions[subject] = pos
            if pos.reason in (EMPTY_MASK, INFEASIBLE) and subject not in self._warned:
                self._warned.add(subject)
                log.info(
                    "%s (level %s): %s sampler fallback %s over %d corners",
                    subject, self.level, self.sampler_name, pos.reason, pos.size,
                )
        return pos

    def _lookalikes(self, subject: str) -> np.ndarray | None:
        found = self.store.lookalikes(subject, self.level)
        if found is None and not self._warned_lookalikes:
            self._warned_lookalikes = True
            log.warning("%s: no lesion look-alikes recorded at level %s (a store written before they were); "
                        "patches are not centred on them until it is reconverted", self.store_url, self.level)
        return found

    def air(self, subject: str) -> np.ndarray:
        """(C,) float32: each channel's value for raw 0 (air) as the network sees it.

        Patches reaching beyond the volume are padded with it, so the network sees air
        there, as at the edge of the field of view, not the brain's mean intensity."""
        channels = len(self.store.modalities)
        zeros = np.zeros((channels, 1, 1, 1), np.float32)
        return (self.store.normalise(subject, zeros) if self.normalise else zeros).reshape(-1)

    def _volume(self, subject: str) -> tuple[np.ndarray, np.ndarray]:
        """The subject's whole level: normalised image and mask (read for the cache)."""
        image = np.asarray(self.store.image(subject, self.level)[...], dtype=np.float32)
        if self.normalise:
            image = self.store.normalise(subject, image)
        mask = np.asarray(self.store.mask(subject, self.level)[...], dtype=np.uint8)
        return image, mask

    def readers(self, subject: str) -> tuple[ChunkReader, ChunkReader]:
        """Direct chunk readers of the subject's image and mask at this level (kept per worker)."""
        if subject not in self._readers:
            self._readers[subject] = (ChunkReader(self.store.image(subject, self.level)),
                                      ChunkReader(self.store.mask(subject, self.level)))
        return self._readers[subject]

    def _read_direct(self, subject: str, corners: list[Triple]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The patches at `corners`, from the chunks they touch, each fetched and decoded once.

        Raw 0 pads outside the volume; normalising turns it into air, as in the cache path."""
        image_reader, mask_reader = self.readers(subject)
        boxes = [(c, self.patch) for c in corners]
        image_chunks = image_reader.fetch(image_reader.chunk_ids(boxes), self._pool(image_reader))
        mask_chunks = mask_reader.fetch(mask_reader.chunk_ids(boxes), self._pool(mask_reader))
        out = []
        for corner in corners:
            image = image_reader.read(corner, self.patch, image_chunks)  # a new float32 array
            if self.normalise:
                image = self.store.normalise(subject, image, in_place=True)
            out.append((image, mask_reader.read(corner, self.patch, mask_chunks)))
        return out

    def _pool(self, reader: ChunkReader) -> list[np.ndarray]:
        # Decoded chunks live only within one visit, so every reader of a chunk size shares one
        # set of buffers: memory stays one visit's worth of chunks, whatever the number of subjects.
        return self._pools.setdefault((reader.chunk, reader.dtype.str), [])

    def _level_bytes(self, subject: str) -> int:
        image, mask = self.readers(subject)
        return int(np.prod(image.shape)) * 4 + int(np.prod(mask.shape))

    def _visit(self, subject: str, corners: list[Triple], air: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """One visit's patches: from the cache, into the cache if it admits the subject, or direct."""
        cache = self._volumes
        cache.visit(subject)
        volume = cache.get(subject)
        if volume is None and cache.max_bytes > 0 and cache.admits(subject, self._level_bytes(subject)):
            volume = self._volume(subject)
            cache.put(subject, volume)
        if volume is None:
            return self._read_direct(subject, corners)
        image, mask = volume
        return [(cut_patch(image, c, self.patch, fill=air), cut_patch(mask, c, self.patch)) for c in corners]

    def stream_seed(self) -> np.random.SeedSequence:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return np.random.SeedSequence([self.seed, self.rank, worker])

    def shard(self) -> list[str]:
        """The subjects this process's stream draws from (see `shard_subjects`)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return shard_subjects(self.subjects, self.rank, self.world_size, worker, workers)

    def __iter__(self) -> Iterator[dict]:
        if self._volumes is None:
            self._volumes = SubjectCache(self.cache_bytes)
        rng = np.random.default_rng(self.stream_seed())
        subjects = self.shard()
        while True:
            for index in rng.permutation(len(subjects)):
                subject = subjects[int(index)]
                pos = self.positions(subject)
                air = self.air(subject)
                corners = [pos.sample(rng) for _ in range(self.samples_per_volume)]
                self._draws[pos.reason] += len(corners)
                for image, mask in self._visit(subject, corners, air):
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
    dataset_kwargs.setdefault("cache_bytes", int(cfg.cache_gib * 2**30))
    dataset = PatchDataset(
        cfg.store,
        subjects,
        level=cfg.level,
        patch_size=cfg.patch,
        sampler=cfg.sampler,
        threshold=cfg.threshold,
        foreground_fraction=cfg.foreground_fraction,
        lookalike_fraction=cfg.lookalike_fraction,
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
