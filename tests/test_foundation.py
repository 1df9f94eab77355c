"""The shared foundations: grids, summed-volume tables, the store's visibility rules, config."""

from __future__ import annotations

import numpy as np
import pytest

from stroke_ray.config import TrainConfig
from stroke_ray.errors import ConfigError
from stroke_ray.grid import cube_affine, keep_lost_components, resample, resample_mask, spacing_of
from stroke_ray.integral import box_sums, integral_volume
from stroke_ray.store import LevelArrays, StrokeStore

LAS_2MM = np.array([[-2.0, 0, 0, 110], [0, 2.0, 0, -120], [0, 0, 2.0, -70], [0, 0, 0, 1]])


def test_box_sums_match_brute_force():
    rng = np.random.default_rng(0)
    mask = (rng.random((9, 7, 6)) > 0.7).astype(np.uint8)
    sums = box_sums(integral_volume(mask), (4, 3, 2))
    assert sums.shape == (6, 5, 5)
    for i, j, k in np.ndindex(*sums.shape):
        assert sums[i, j, k] == mask[i : i + 4, j : j + 3, k : k + 2].sum()


def test_cube_affine_keeps_aspect_and_centre():
    shape = (112, 112, 73)
    cube = cube_affine(shape, LAS_2MM, 64)
    # Longest extent is 224 mm -> 3.5 mm voxels on every axis, directions kept.
    assert np.allclose(spacing_of(cube), 3.5)
    assert np.sign(cube[0, 0]) == np.sign(LAS_2MM[0, 0])
    centre_src = LAS_2MM @ np.array([55.5, 55.5, 36.0, 1.0])
    centre_dst = cube @ np.array([31.5, 31.5, 31.5, 1.0])
    assert np.allclose(centre_src, centre_dst)


def test_resample_round_trip_keeps_a_blob_in_place():
    shape = (40, 40, 30)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    blob = ((x - 25) ** 2 + (y - 12) ** 2 + (z - 18) ** 2 <= 36).astype(np.uint8)
    cube = cube_affine(shape, LAS_2MM, 32)
    down = resample_mask(blob, LAS_2MM, (32, 32, 32), cube)
    back = resample_mask(down, cube, shape, LAS_2MM)
    com = lambda m: np.array(np.nonzero(m)).mean(axis=1)  # noqa: E731
    assert np.abs(com(back) - com(blob)).max() < 1.0
    # Area-preserving mask resampling: volume within 20 % at a 1.25x coarser grid.
    assert abs(back.sum() - blob.sum()) / blob.sum() < 0.2
    smooth = resample(blob.astype(np.float32), LAS_2MM, (32, 32, 32), cube)
    assert 0.0 < smooth.max() <= 1.0


def test_a_lesion_smaller_than_the_target_voxel_survives_resampling():
    # A 1-voxel lesion on a 1 mm grid, resampled onto a 2 mm grid offset by half a voxel:
    # linear interpolation spreads it over 8 voxels at 1/8 each, below 0.5, and it would vanish.
    src = np.eye(4)
    dst = np.diag([2.0, 2.0, 2.0, 1.0])
    dst[:3, 3] = 0.5
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[9, 9, 9] = 1  # world (9, 9, 9): target voxel (4.25, 4.25, 4.25) -> (4, 4, 4)
    mask[2:12, 14:20, 2:8] = 1  # a large lesion, which survives on its own
    soft = resample(mask.astype(np.float32), src, (10, 10, 10), dst, order=1, antialias=False)
    assert soft[3:6, 3:6, 3:6].max() < 0.5  # the dot is gone from plain interpolation
    out = resample_mask(mask, src, (10, 10, 10), dst)
    assert out[4, 4, 4] == 1 and out[3:6, 3:6, 3:6].sum() == 1  # given back at one voxel
    assert np.array_equal(out[:, 6:, :], (soft >= 0.5)[:, 6:, :].astype(np.uint8))  # the large one untouched
    # a probability map: the peak's value, at the voxel holding the peak
    prob = np.zeros((20, 20, 20), np.float32)
    prob[9, 9, 9], prob[10, 9, 9] = 0.9, 0.6
    coarse = resample(prob, src, (10, 10, 10), dst, order=1, antialias=True)
    assert coarse.max() < 0.5
    assert keep_lost_components(prob, src, coarse, dst) == 1
    assert coarse.max() == np.float32(0.9) and coarse[4, 4, 4] == np.float32(0.9)
    # nothing to give back: a lesion that survives, or one outside the target grid
    assert keep_lost_components(prob, src, coarse, dst) == 0
    far = np.eye(4)
    far[:3, 3] = 100.0
    assert keep_lost_components(prob, far, np.zeros((10, 10, 10), np.float32), dst) == 0


def test_store_hides_incomplete_subjects_and_checks_settings(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = StrokeStore.create(url, ["dwi", "adc"], ["native"], normalization="zscore")
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    image = np.stack([np.full((8, 8, 8), 10.0), np.full((8, 8, 8), 2.0)]).astype(np.float32)
    attrs = {"norm": {"mean": [10.0, 1.0], "std": [2.0, 0.5]}}
    store.write_subject("sub-a", {"native": LevelArrays(image, mask, LAS_2MM)}, attrs)
    # An interrupted conversion: group exists, `complete` never written.
    store.group["subjects"].create_group("sub-b")
    reopened = StrokeStore.open(url)
    assert reopened.subjects() == ["sub-a"]
    assert reopened.subjects(include_incomplete=True) == ["sub-a", "sub-b"]
    assert int(reopened.mask_integral("sub-a")[-1, -1, -1]) == 8
    assert np.allclose(reopened.affine("sub-a"), LAS_2MM)
    normed = reopened.normalise("sub-a", reopened.image("sub-a")[:, :2, :2, :2])
    assert np.allclose(normed[0], 0.0) and np.allclose(normed[1], 2.0)
    with pytest.raises(ValueError, match="existing store was made with"):
        StrokeStore.create(url, ["dwi"], ["native"])


def test_train_config_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  architecture: resnet\nbatch_size: 0\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(bad)
    assert str(bad) in str(err.value)
    assert "model.architecture" in str(err.value) and "batch_size" in str(err.value)
    with pytest.raises(ConfigError, match="unknown_key"):
        TrainConfig.from_dict({"unknown_key": 1})
