"""Lesion look-alikes: found at convert time, away from lesions, and sampled as hard negatives."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from stroke_ray.config import DataConfig
from stroke_ray.errors import ConfigError
from stroke_ray.integral import integral_volume
from stroke_ray.lookalikes import LESION_MARGIN, find_lookalikes
from stroke_ray.samplers import LesionSampler
from stroke_ray.sampling import PatchDataset
from stroke_ray.store import LevelArrays, StrokeStore

SPOTS = [(8, 30, 20), (30, 10, 28), (32, 32, 10)]  # bright non-lesion spots
LESION = (20, 20, 20)


def _brain(dark_lesion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A 2-channel 40^3 'brain' with three bright spots and one lesion (bright, or dark)."""
    rng = np.random.default_rng(0)
    image = np.zeros((2, 40, 40, 40), np.float32)
    image[:, 2:38, 2:38, 2:38] = rng.normal(100.0, 0.5, (2, 36, 36, 36))  # smooth tissue: only the spots stand out
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[LESION[0] - 1:LESION[0] + 2, LESION[1] - 1:LESION[1] + 2, LESION[2] - 1:LESION[2] + 2] = 1
    image[0][mask > 0] = 30.0 if dark_lesion else 200.0
    for i, spot in enumerate(SPOTS):
        image[0][spot] = 300.0 - 20 * i  # the first spot the brightest
    image[0][LESION[0] + 2, LESION[1], LESION[2]] = 400.0  # bright, but beside the lesion
    return image, mask


def test_lookalikes_are_the_bright_spots_away_from_lesions_brightest_first():
    image, mask = _brain()
    found = find_lookalikes(image, mask)
    assert [tuple(v) for v in found] == SPOTS
    lesion = np.argwhere(mask > 0)
    assert all(np.abs(lesion - v).max(axis=1).min() > LESION_MARGIN for v in found)
    assert len(find_lookalikes(image, mask, max_count=2)) == 2


def test_dark_lesions_make_dark_spots_the_lookalikes():
    image, mask = _brain(dark_lesion=True)
    image[0][5, 5, 5] = 5.0  # a dark spot: what looks like a T1w lesion
    found = [tuple(v) for v in find_lookalikes(image, mask)]
    assert (5, 5, 5) in found and not any(s in found for s in SPOTS)


def test_no_brain_no_lookalikes():
    assert find_lookalikes(np.zeros((1, 8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8)).shape == (0, 3)


def test_lesion_sampler_centres_its_share_of_patches_on_lookalikes():
    image, mask = _brain()
    pos = LesionSampler(0.5).positions(integral_volume(mask), 8).with_lookalikes(find_lookalikes(image, mask), 0.25)
    rng = np.random.default_rng(1)
    corners = np.array([pos.sample(rng) for _ in range(4000)])

    def share(voxel):
        return np.mean(np.all((corners <= voxel) & (voxel < corners + 8), axis=1))

    on_lesion = np.mean([mask[c[0]:c[0] + 8, c[1]:c[1] + 8, c[2]:c[2] + 8].any() for c in corners])
    on_spot = np.mean([share(np.array(s)) for s in SPOTS])
    assert 0.48 < on_lesion < 0.62  # half on the lesion, plus uniform draws that hold it
    assert len(find_lookalikes(image, mask)) == len(SPOTS)
    # a quarter spread over the three spots (plus uniform draws), far more than an ordinary voxel
    assert 0.25 / 3 < on_spot < 0.25 / 3 + 0.05 and on_spot > 3 * share(np.array((20, 8, 8)))
    plain = LesionSampler(0.5).positions(integral_volume(mask), 8)
    assert plain.with_lookalikes(None, 0.25) is plain and plain.lookalikes is None
    with pytest.raises(ValueError, match="exceeds 1"):
        LesionSampler(0.9).positions(integral_volume(mask), 8).with_lookalikes(np.array([SPOTS[0]]), 0.2)


def test_lookalike_draws_leave_the_plain_stream_unchanged():
    image, mask = _brain()
    table = integral_volume(mask)
    def draws(pos, n=200):
        rng = np.random.default_rng(3)
        return [pos.sample(rng) for _ in range(n)]

    # Without look-alikes (none recorded, or a share of 0) the sampler draws exactly as before.
    plain = draws(LesionSampler(0.5).positions(table, 8))
    assert draws(LesionSampler(0.5).positions(table, 8).with_lookalikes(None, 0.3)) == plain
    assert draws(LesionSampler(0.5).positions(table, 8).with_lookalikes(find_lookalikes(image, mask), 0.0)) == plain
    assert draws(LesionSampler(0.5).positions(table, 8).with_lookalikes(find_lookalikes(image, mask), 0.3)) != plain


def test_store_keeps_lookalikes_and_the_dataset_samples_them(tmp_path, caplog):
    image, mask = _brain()
    url = str(tmp_path / "s.zarr")
    store = StrokeStore.create(url, ["dwi", "adc"], levels=["native"])
    norm = {"norm": {"mean": [100.0, 100.0], "std": [3.0, 3.0]}}
    store.write_subject("sub-a", {"native": LevelArrays(image, mask, np.eye(4), lookalikes=find_lookalikes(image, mask))}, norm)
    store.write_subject("sub-old", {"native": LevelArrays(image, mask, np.eye(4))}, norm)  # as an older store wrote it
    assert [tuple(v) for v in store.lookalikes("sub-a", "native")[:3]] == SPOTS
    assert store.lookalikes("sub-old", "native") is None
    ds = PatchDataset(url, ["sub-a"], level="native", patch_size=8, sampler="lesion", foreground_fraction=0.0,
                      lookalike_fraction=1.0, samples_per_volume=1)
    pos = ds.positions("sub-a")
    assert pos.lookalike_fraction == 1.0 and len(pos.lookalikes) >= 3
    with caplog.at_level(logging.WARNING, logger="stroke_ray.sampling"):
        old = PatchDataset(url, ["sub-old"], level="native", patch_size=8, sampler="lesion", lookalike_fraction=0.2)
        assert old.positions("sub-old").lookalikes is None
    assert "reconverted" in caplog.text


@pytest.mark.parametrize("raw, problem", [
    ({"sampler": "threshold", "lookalike_fraction": 0.2}, "foreground or lesion sampler"),
    ({"sampler": "lesion", "foreground_fraction": 0.9, "lookalike_fraction": 0.2}, "exceeds 1"),
])
def test_lookalike_fraction_is_checked_with_the_sampler(raw, problem):
    from stroke_ray.config import TrainConfig

    with pytest.raises(ConfigError, match=problem):
        TrainConfig.from_dict({"data": raw})
    assert DataConfig(sampler="lesion", foreground_fraction=0.5, lookalike_fraction=0.25).lookalike_fraction == 0.25
