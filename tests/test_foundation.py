"""The shared foundations: grids, summed-volume tables, the store's visibility rules, config."""

from __future__ import annotations

import numpy as np
import pytest

from stroke_ray.config import TrainConfig
from stroke_ray.errors import ConfigError
from stroke_ray.grid import cube_affine, resample, resample_mask, spacing_of
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
