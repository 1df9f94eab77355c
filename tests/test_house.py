"""The shared homes: atomic files, NIfTI names, local-or-URL locations, one z-score."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stroke_ray.files import atomic_path, atomic_write_bytes, atomic_write_text, strip_nifti_suffix
from stroke_ray.inference import normalise_case
from stroke_ray.intensity import normalise
from stroke_ray.locations import absolute, exists, is_url, join, local_or_url
from stroke_ray.store import LevelArrays, StrokeStore


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_temporary_name_is_hidden_and_not_nifti(tmp_path):
    with atomic_path(tmp_path / "case_dwi.nii.gz") as tmp:
        assert tmp.name.startswith(".") and tmp.name.endswith(".part")
        assert tmp.parent == tmp_path


@pytest.mark.parametrize("name,stem", [
    ("sub-1_dwi.nii.gz", "sub-1_dwi"), ("a/b/sub-1_dwi.nii", "sub-1_dwi"), ("notes.txt", "notes.txt"),
])
def test_strip_nifti_suffix(name, stem):
    assert strip_nifti_suffix(name) == stem


def test_locations_keep_urls_and_make_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_url("s3://bucket/x") and not is_url("data/x.zarr")
    assert absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert absolute("data/x.zarr") == str(tmp_path.resolve() / "data" / "x.zarr")
    assert join("s3://bucket/runs/", "sweep", "best") == "s3://bucket/runs/sweep/best"
    assert join("runs", "sweep") == str(Path("runs") / "sweep")
    assert local_or_url("file:///tmp/x") == "/tmp/x" and local_or_url("memory://x") == "memory://x"
    assert exists("s3://bucket/anything") and not exists(tmp_path / "missing")


def test_store_reads_and_prediction_normalise_identically(tmp_path):
    """One z-score for training and prediction: the same numbers for the same subject."""
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, (2, 8, 8, 8)).astype(np.float32)
    norm = {"mean": [100.0, 90.0], "std": [20.0, 10.0]}
    store = StrokeStore.create(str(tmp_path / "s.zarr"), ["dwi", "adc"], ["native"])
    store.write_subject("sub-1", {"native": LevelArrays(image, np.zeros((8, 8, 8), np.uint8), np.eye(4))},
                        {"norm": norm})
    from_store = store.normalise("sub-1", np.asarray(store.image("sub-1")[...]))
    from_case = normalise_case(image, {"norm": norm}, "zscore")
    np.testing.assert_array_equal(from_store, from_case)
    np.testing.assert_allclose(from_case[1], (image[1] - 90.0) / 10.0, rtol=1e-6)
    assert normalise(image, "none", None).dtype == np.float32
    with pytest.raises(ValueError, match="unknown normalization"):
        normalise(image, "minmax", norm)


def test_old_data_num_workers_key_names_its_new_name(tmp_path):
    from stroke_ray.config import TrainConfig
    from stroke_ray.errors import ConfigError

    path = tmp_path / "old.yaml"
    path.write_text("data:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"old.yaml: data: num_workers was renamed loader_workers"):
        TrainConfig.from_yaml(path)
    assert TrainConfig.from_dict({"data": {"loader_workers": 2}}).data.loader_workers == 2


def test_stored_config_with_the_old_num_workers_key_is_migrated():
    from stroke_ray.config import TrainConfig
    from stroke_ray.errors import ConfigError

    stored = {"name": "old-run", "num_workers": 1, "data": {"num_workers": 2, "level": "32"}}
    migrated = TrainConfig.from_stored(stored, source="old.pt")
    assert migrated.data.loader_workers == 2 and migrated.num_workers == 1 and migrated.data.level == "32"
    assert stored["data"] == {"num_workers": 2, "level": "32"}  # the caller's dict is left as it was
    # both names: the new one counts
    both = TrainConfig.from_stored({"data": {"num_workers": 2, "loader_workers": 4}})
    assert both.data.loader_workers == 4
    # migration fixes renamed keys only: anything else invalid is still an error naming the source
    with pytest.raises(ConfigError, match=r"old.pt: data.threshold"):
        TrainConfig.from_stored({"data": {"num_workers": 2, "threshold": 3.0}}, source="old.pt")
    # a new config file with the old key still gets the error naming the new key
    with pytest.raises(ConfigError, match="num_workers was renamed loader_workers"):
        TrainConfig.from_dict({"data": {"num_workers": 2}})
