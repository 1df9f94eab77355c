"""Subject split, patch samplers and the patch stream, on tiny real Zarr stores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stroke_ray.config import DataConfig
from stroke_ray.integral import integral_volume
from stroke_ray.samplers import (
    ACCEPTED,
    EMPTY_MASK,
    FOREGROUND,
    INFEASIBLE,
    ForegroundSampler,
    LesionSampler,
    Sampler,
    ThresholdSampler,
    UniformSampler,
)
from stroke_ray.sampling import PatchDataset, cut_patch, make_loader, shard_subjects
from stroke_ray.splits import split_manifest, split_subjects
from stroke_ray.store import LevelArrays, StrokeStore


def brute_force_accepted(mask: np.ndarray, n: int, threshold: float, reference: str) -> set:
    """The rejection test of every corner, written out literally (zero padding outside)."""
    total = mask.sum()
    origin = [min(0, s - n) for s in mask.shape]
    stop = [max(0, s - n) for s in mask.shape]
    kept = set()
    for corner in itertools.product(*(range(o, e + 1) for o, e in zip(origin, stop))):
        count = cut_patch(mask, corner, (n, n, n)).sum()
        denominator = total if reference == "subject" else n**3
        if count / denominator > threshold:
            kept.add(corner)
    return kept


def corner_set(pos) -> set:
    return {tuple(int(v) for v in c) for c in pos.all_corners()}


@pytest.mark.parametrize("reference", ["subject", "cube"])
def test_threshold_accepted_set_equals_brute_force(reference):
    rng = np.random.default_rng(3)
    mask = np.zeros((13, 11, 9), np.uint8)
    mask[3:9, 2:8, 1:6] = rng.random((6, 6, 5)) < 0.6
    mask[10:12, 8:10, 6:8] = 1  # a second, small lesion
    table = integral_volume(mask)
    thresholds = [0.0, 0.1, 0.3, 0.5, 0.7] if reference == "subject" else [0.0, 0.05, 0.2, 0.4]
    nonempty = 0
    for n in (4, 6):
        for t in thresholds:
            pos = ThresholdSampler(t, reference=reference).positions(table, n)
            expected = brute_force_accepted(mask, n, t, reference)
            if expected:
                nonempty += 1
                assert pos.reason == ACCEPTED
                assert corner_set(pos) == expected, (n, t)
            else:
                assert pos.reason == INFEASIBLE
    assert nonempty >= 6  # the comparison is not vacuous


def test_threshold_with_patch_larger_than_volume_pads():
    mask = np.zeros((5, 12, 4), np.uint8)
    mask[1:4, 6:9, 1:3] = 1
    pos = ThresholdSampler(0.5).positions(integral_volume(mask), 6)
    assert corner_set(pos) == brute_force_accepted(mask, 6, 0.5, "subject")
    assert min(c[0] for c in corner_set(pos)) < 0  # padded axes give negative corners


def test_draws_are_uniform_over_accepted_set():
    rng = np.random.default_rng(0)
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[3:7, 3:7, 3:7] = 1
    pos = ThresholdSampler(0.3).positions(integral_volume(mask), 5)
    accepted = corner_set(pos)
    assert 5 < len(accepted) < 6**3
    draws = 200 * len(accepted)
    counts: dict = {}
    for _ in range(draws):
        c = pos.sample(rng)
        counts[c] = counts.get(c, 0) + 1
    assert set(counts) == accepted  # every accepted corner drawn, nothing rejected drawn
    observed = np.array([counts[c] for c in sorted(accepted)], float)
    expected = draws / len(accepted)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    dof = len(accepted) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof)  # far beyond the 99.9th percentile otherwise


def test_empty_mask_falls_back_to_uniform():
    table = integral_volume(np.zeros((8, 8, 8), np.uint8))
    for sampler in (ThresholdSampler(0.4), ThresholdSampler(0.4, "cube"), ForegroundSampler(1.0)):
        pos = sampler.positions(table, 4)
        assert pos.reason == EMPTY_MASK
        assert pos.size == 5**3
        assert corner_set(pos) == set(itertools.product(range(5), repeat=3))


def test_lesion_larger_than_cube_is_infeasible_and_uses_max_count_corners():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:18, 2:18, 2:18] = 1  # 16^3 lesion; an 8^3 cube holds at most 1/8 of it
    pos = ThresholdSampler(0.4).positions(integral_volume(mask), 8)
    assert pos.reason == INFEASIBLE
    corners = corner_set(pos)
    full = set(itertools.product(range(2, 11), repeat=3))  # cubes fully inside the lesion
    assert corners == full
    rng = np.random.default_rng(1)
    for _ in range(50):
        assert pos.sample(rng) in full


def test_uniform_and_foreground_samplers():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[7, 8, 2] = 1
    table = integral_volume(mask)
    rng = np.random.default_rng(0)
    uni = UniformSampler().positions(table, 4)
    draws = np.array([uni.sample(rng) for _ in range(3000)])
    assert draws.min() == 0 and draws.max() == 6
    fg = ForegroundSampler(1.0).positions(table, 4)
    assert fg.reason == FOREGROUND
    for _ in range(300):
        c = np.array(fg.sample(rng))
        assert np.all(c >= 0) and np.all(c <= 6)
        assert np.all(c <= [7, 8, 2]) and np.all(c + 4 > [7, 8, 2])  # lesion voxel inside
    half = ForegroundSampler(0.5).positions(table, 4)
    hits = sum(cut_patch(mask, half.sample(rng), (4, 4, 4)).any() for _ in range(2000))
    # 50 % lesion-centred plus the uniform draws that happen to hit it (~ 4^3/7^3 * ...).
    assert 0.45 * 2000 < hits < 0.65 * 2000


def test_split_is_deterministic_disjoint_and_stable():
    subjects = [f"sub-{i:03d}" for i in range(20)]
    train, val = split_subjects(subjects, 0.2, seed=0)
    assert (train, val) == split_subjects(list(reversed(subjects)), 0.2, seed=0)
    assert not set(train) & set(val) and sorted(train + val) == subjects
    assert len(val) == 4
    assert split_subjects(subjects, 0.2, seed=1) != (train, val)
    # Adding a subject keeps everyone else where they were unless the val count grows.
    _, val2 = split_subjects(subjects + ["sub-999"], 0.2, seed=0)
    assert set(val2) <= set(val) | {"sub-999"} and len(set(val) & set(val2)) >= len(val) - 1
    assert split_subjects(["a", "b"], 0.01)[1] and split_subjects(["a", "b"], 0.99)[0]
    assert split_subjects(["a"], 0.2) == (["a"], [])
    manifest = split_manifest(train, val, seed=0)
    assert manifest["val"] == val and manifest["num_train"] == 16 and len(manifest["sha256"]) == 64


# --- the patch stream on a real store --------------------------------------------------------
N_SUBJECTS = 3


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> str:
    """Three 2-channel subjects at a 16^3 level (one with an empty mask) plus a native level."""
    url = str(tmp_path_factory.mktemp("sampling") / "tiny.zarr")
    store = StrokeStore.create(url, ["dwi", "adc"], levels=["native", "16"])
    rng = np.random.default_rng(0)
    for i in range(N_SUBJECTS):
        image = rng.normal(100 + 10 * i, 5, (2, 16, 16, 16)).astype(np.float32)
        image[1] *= 3
        mask = np.zeros((16, 16, 16), np.uint8)
        if i < 2:
            mask[4 + i : 9 + i, 5:10, 6:11] = 1
        native = LevelArrays(image[:, :, :, :10], mask[:, :, :10], np.diag([2.0, 2, 3, 1]))
        cube = LevelArrays(image, mask, np.eye(4) * 1.5 + np.diag([0, 0, 0, -0.5]))
        mean = image.reshape(2, -1).mean(1)
        std = image.reshape(2, -1).std(1)
        store.write_subject(
            f"sub-{i}", {"native": native, "16": cube}, {"norm": {"mean": mean, "std": std}}
        )
    return url


def take(iterable, n):
    return list(itertools.islice(iter(iterable), n))


def test_patches_shape_channels_normalisation(tiny_store):
    subjects = [f"sub-{i}" for i in range(N_SUBJECTS)]
    ds = PatchDataset(tiny_store, subjects, "16", 8, sampler="threshold", threshold=0.3,
                      samples_per_volume=4, seed=0)
    items = take(ds, 4 * N_SUBJECTS * 3)
    store = StrokeStore.open(tiny_store)
    for item in items:
        assert item["image"].shape == (2, 8, 8, 8) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 8, 8, 8) and item["mask"].dtype == torch.float32
    # normalised with the subject's stored stats: the whole-volume normalised mean is ~0.
    pooled = torch.cat([i["image"].reshape(2, -1) for i in items], 1)
    assert pooled.mean(1).abs().max() < 0.3 and (pooled.std(1) - 1).abs().max() < 0.3
    # a patch equals the stored volume normalised and cut at some corner
    item = items[0]
    image = store.normalise(item["subject"], store.image(item["subject"], "16")[...])
    found = any(
        np.allclose(cut_patch(image, c, (8, 8, 8)), item["image"].numpy())
        for c in itertools.product(range(9), repeat=3)
    )
    assert found
    # lesion subjects give lesion-rich patches (> 30 % of the lesion), empty one: fallback
    for item in items:
        if item["subject"] != "sub-2":
            assert item["mask"].sum() > 0.3 * 125
    stats = ds.stats()
    assert stats["subjects"] == {ACCEPTED: 2, EMPTY_MASK: 1}
    assert stats["draws"][EMPTY_MASK] == 12 and stats["draws"][ACCEPTED] == 24


def test_patch_larger_than_native_level_is_padded(tiny_store):
    ds = PatchDataset(tiny_store, ["sub-0"], "native", 12, sampler="uniform", normalise=False)
    for item in take(ds, 10):
        assert item["image"].shape == (2, 12, 12, 12)
        # z is 10 voxels long: at least 2 planes of zero padding along z
        assert (item["image"][..., :].abs().sum(dim=(0, 1, 2)) == 0).sum() >= 2
    # the direct (uncached) Zarr read path cuts the same patches
    direct = PatchDataset(tiny_store, ["sub-0"], "native", 12, sampler="uniform",
                          normalise=False, cache_bytes=0)
    for a, b in zip(take(ds, 5), take(direct, 5)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_normalised_patches_are_padded_with_air_not_the_mean(tiny_store):
    """Beyond the volume a patch holds each channel's normalised raw 0 (air), whichever
    read path cut it; an anisotropic patch size is honoured."""
    store = StrokeStore.open(tiny_store)
    mean, std = store.norm_stats("sub-0")
    air = -mean / std  # raw 0 after z-scoring: about -20 for these channels, far from 0
    cached = PatchDataset(tiny_store, ["sub-0"], "native", (12, 8, 14), sampler="uniform")
    direct = PatchDataset(tiny_store, ["sub-0"], "native", (12, 8, 14), sampler="uniform", cache_bytes=0)
    for a, b in zip(take(cached, 6), take(direct, 6)):
        assert a["image"].shape == (2, 12, 8, 14) and a["mask"].shape == (1, 12, 8, 14)
        np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a["air"].numpy(), air, rtol=1e-6)
        # z is 10 voxels long, the patch 14: at least 4 planes are pure air in every channel
        planes = a["image"].numpy().transpose(3, 0, 1, 2).reshape(14, 2, -1)
        is_air = np.all(np.isclose(planes, air[None, :, None], atol=1e-4), axis=(1, 2))
        assert is_air.sum() >= 4


def _stream_keys(loader, n):
    return [(s, float(img.sum())) for batch in take(loader, n)
            for s, img in zip(batch["subject"], batch["image"])]


def test_workers_and_ranks_get_distinct_reproducible_streams(tiny_store):
    subjects = [f"sub-{i}" for i in range(N_SUBJECTS)]
    cfg = DataConfig(store=tiny_store, level="16", patch_size=8, sampler="uniform",
                     samples_per_volume=1, loader_workers=2)
    loader = make_loader(cfg, subjects, batch_size=1, seed=7)
    first = _stream_keys(loader, 8)
    again = _stream_keys(make_loader(cfg, subjects, batch_size=1, seed=7), 8)
    assert first == again  # same seed: same stream
    # DataLoader alternates workers batch by batch: worker 0 = even, worker 1 = odd
    assert first[0::2] != first[1::2]
    other_seed = _stream_keys(make_loader(cfg, subjects, batch_size=1, seed=8), 8)
    assert other_seed != first
    single = cfg.model_copy(update={"loader_workers": 0})
    rank0 = _stream_keys(make_loader(single, subjects, 1, seed=7, rank=0, world_size=2), 6)
    rank1 = _stream_keys(make_loader(single, subjects, 1, seed=7, rank=1, world_size=2), 6)
    assert rank0 != rank1
    assert rank0 == _stream_keys(make_loader(single, subjects, 1, seed=7, rank=0, world_size=2), 6)
    # worker 0 of a 2-worker loader draws what rank 0's single-process stream draws
    assert first[0::2] == rank0[:4]


def test_shards_are_disjoint_cover_everything_and_degrade_gracefully():
    subjects = [f"sub-{i:02d}" for i in range(7)]
    for world, workers in ((2, 1), (2, 2), (3, 2), (1, 3)):
        shards = [shard_subjects(subjects, r, world, w, workers) for r in range(world) for w in range(workers)]
        assert sorted(s for shard in shards for s in shard) == subjects  # disjoint and complete
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    # 3 subjects, 2 ranks x 2 loader workers: shards per rank (workers share, differ by seed)
    few = subjects[:3]
    assert shard_subjects(few, 0, 2, 0, 2) == shard_subjects(few, 0, 2, 1, 2) == ["sub-00", "sub-02"]
    assert shard_subjects(few, 1, 2, 0, 2) == ["sub-01"]
    # fewer subjects than ranks: every rank takes them all
    assert shard_subjects(few[:1], 1, 2) == ["sub-00"]


def test_two_ranks_never_draw_the_same_subject(tiny_store):
    subjects = [f"sub-{i}" for i in range(N_SUBJECTS)]
    cfg = DataConfig(store=tiny_store, level="16", patch_size=8, sampler="uniform", samples_per_volume=1)
    drawn = [{s for batch in take(make_loader(cfg, subjects, 2, seed=3, rank=r, world_size=2), 6)
              for s in batch["subject"]} for r in (0, 1)]
    assert drawn[0] and drawn[1] and not drawn[0] & drawn[1]
    assert drawn[0] | drawn[1] == set(subjects)


class CountingReads(PatchDataset):
    """Counts whole-level reads from Zarr (what filling the cache costs)."""

    reads = 0

    def _volume(self, subject):
        self.reads += 1
        return super()._volume(subject)


def test_cache_holds_the_hottest_subjects_within_its_budget(tiny_store):
    subjects = [f"sub-{i}" for i in range(N_SUBJECTS)]
    # no budget: never a whole-level read, every patch straight from its chunks
    uncached = CountingReads(tiny_store, subjects, "16", 8, samples_per_volume=4, cache_bytes=1)
    take(uncached, 4 * N_SUBJECTS * 2)  # two passes
    assert uncached.reads == 0 and uncached._volumes.bytes == 0
    # room for all: each subject read once, then served from RAM
    cached = CountingReads(tiny_store, subjects, "16", 8, samples_per_volume=4)
    take(cached, 4 * N_SUBJECTS * 3)
    assert cached.reads == N_SUBJECTS
    # room for two of three: the same two stay (an LRU would evict on every visit), the
    # third is read directly; the budget holds
    one_case = 2 * 16**3 * 4 + 16**3  # bytes of one subject's image + mask
    small = CountingReads(tiny_store, subjects, "16", 8, samples_per_volume=4, cache_bytes=2 * one_case)
    take(small, 4 * N_SUBJECTS * 5)
    assert small.reads == 2
    assert small._volumes.bytes <= 2 * one_case
    assert sum(s in small._volumes for s in subjects) == 2


def test_a_subject_visited_more_often_displaces_a_colder_one():
    from stroke_ray.subject_cache import SubjectCache

    cache = SubjectCache(max_bytes=200)
    block = (np.zeros(100, np.uint8),)
    for key in ("a", "b"):
        cache.visit(key)
        assert cache.admits(key, 100)
        cache.put(key, block)
    for _ in range(2):
        cache.visit("c")
    assert not cache.admits("c", 100)  # 2 visits vs 1: within the margin, the cache stays
    cache.visit("c")
    cache.visit("a")
    assert cache.admits("c", 100)  # 3 vs b's 1: b goes, a (2 visits) stays
    cache.put("c", block)
    assert "a" in cache and "c" in cache and "b" not in cache and cache.bytes == 200
    assert not cache.admits("d", 300)  # larger than the whole budget


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory) -> str:
    """Two subjects at a 20x16x12 level stored in 8^3 chunks (edge chunks partial; the mask's
    lesion-free chunks are never written, so they read as the fill value)."""
    url = str(tmp_path_factory.mktemp("chunked") / "chunked.zarr")
    store = StrokeStore.create(url, ["dwi", "adc"], levels=["20"])
    rng = np.random.default_rng(1)
    for i in range(2):
        image = rng.normal(50, 5, (2, 20, 16, 12)).astype(np.float32)
        mask = np.zeros((20, 16, 12), np.uint8)
        mask[3 + i : 7 + i, 2:6, 4:9] = 1
        store.write_subject(f"sub-{i}", {"20": LevelArrays(image, mask, np.eye(4))},
                            {"norm": {"mean": [50.0, 50.0], "std": [5.0, 5.0]}}, chunk_edge=8)
    return url


@pytest.mark.parametrize("patch", [8, (12, 6, 10), 24])
def test_direct_reads_give_the_cached_patches(chunked_store, patch):
    """Same seed, same corners: the direct chunk path and the RAM path cut identical patches
    (inside a chunk, across chunk edges, and reaching past the volume: padded with air)."""
    subjects = ["sub-0", "sub-1"]
    streams = [PatchDataset(chunked_store, subjects, "20", patch, sampler="uniform", samples_per_volume=3,
                            seed=5, cache_bytes=budget) for budget in (0, 2**30)]
    for direct, cached in zip(*(take(s, 12) for s in streams)):
        assert direct["subject"] == cached["subject"]
        np.testing.assert_allclose(direct["image"], cached["image"], rtol=0, atol=1e-6)
        assert torch.equal(direct["mask"], cached["mask"])


def test_stream_from_a_converted_store(synth_store):
    """The patch stream on ingest's own output (32^3 level of synthetic ISLES cases)."""
    store = StrokeStore.open(synth_store)
    train, val = split_subjects(store.subjects(), 0.25, seed=0)
    assert len(train) == 3 and len(val) == 1
    cfg = DataConfig(store=synth_store, level="32", patch_size=16, sampler="threshold",
                     threshold=0.2, samples_per_volume=2)
    batch = next(iter(make_loader(cfg, train, batch_size=4, seed=0)))
    assert batch["image"].shape == (4, len(store.modalities), 16, 16, 16)
    assert batch["mask"].shape == (4, 1, 16, 16, 16)
    assert set(batch["subject"]) <= set(train)
    assert all(m.sum() > 0 for m in batch["mask"])  # threshold patches hold lesion


def test_lesion_sampler_gives_every_lesion_the_same_share():
    # A 6x6x6 "infarct" (216 voxels) and two single-voxel "emboli": voxel-uniform foreground
    # sampling centres 99 % of its lesion patches on the infarct, the lesion sampler a third.
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    mask[20, 20, 20] = 1
    mask[27, 3, 25] = 1
    table = integral_volume(mask)
    rng = np.random.default_rng(0)
    lesion = LesionSampler(1.0).positions(table, 4)
    assert lesion.reason == FOREGROUND and lesion.lesion_starts.tolist() == [0, 216, 217, 218]
    emboli = [(20, 20, 20), (27, 3, 25)]

    def holds(corner, voxel):
        return all(c <= v < c + 4 for c, v in zip(corner, voxel))

    draws = [lesion.sample(rng) for _ in range(3000)]
    shares = [np.mean([holds(c, v) for c in draws]) for v in emboli]
    assert all(0.29 < share < 0.38 for share in shares)
    assert all(any(holds(c, v) for v in [*emboli, (4, 4, 4)]) or mask[c[0]:c[0] + 4, c[1]:c[1] + 4, c[2]:c[2] + 4].any()
               for c in draws)  # every draw holds a lesion voxel (fraction 1)
    voxel_uniform = ForegroundSampler(1.0).positions(table, 4)
    draws = [voxel_uniform.sample(rng) for _ in range(3000)]
    assert np.mean([holds(c, emboli[0]) for c in draws]) < 0.02
    # no lesion: uniform, as the foreground sampler
    assert LesionSampler(1.0).positions(integral_volume(np.zeros((8, 8, 8), np.uint8)), 4).reason == EMPTY_MASK


def test_every_sampler_follows_the_sampler_protocol():
    from stroke_ray.samplers import build_sampler

    for name in ("uniform", "threshold", "threshold_cube", "foreground", "lesion"):
        sampler = build_sampler(name)
        assert isinstance(sampler, Sampler) and sampler.name in name
