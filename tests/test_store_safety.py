"""Nothing lost in the store: reconversions killed at every step, one writer at a time, formats."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from stroke_ray.errors import StrokeRayError
from stroke_ray.ingest import convert_dataset
from stroke_ray.store import FORMAT_VERSION, LevelArrays, StoreError, StrokeStore
from stroke_ray.store_lock import LOCK_NAME, StoreBusyError, writer_lock

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 12, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 + 10 * rng.standard_normal(SHAPE)).astype(np.float32)


def write_subject(root: Path, sub: str, seed: int) -> Path:
    folder = root / "rawdata" / sub / "ses-1"
    folder.mkdir(parents=True, exist_ok=True)
    for i, modality in enumerate(("dwi", "adc", "flair")):
        nib.save(nib.Nifti1Image(volume(seed + i), AFFINE), str(folder / f"{sub}_ses-1_{modality}.nii.gz"))
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:7, 3:7, 3:6] = 1
    deriv = root / "derivatives" / sub / "ses-1"
    deriv.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, AFFINE), str(deriv / f"{sub}_ses-1_msk.nii.gz"))
    return folder / f"{sub}_ses-1_dwi.nii.gz"


def convert(root: Path, out: Path):
    return convert_dataset(str(root), str(out), levels=[16], normalization="none", parallel=False, progress=False)


def run_child(script: str, *args: str, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


# --- a reconversion killed at each step -----------------------------------------------------------
KILLING_CONVERT = r"""
import os, signal, sys
import zarr
from stroke_ray.ingest import convert_dataset
from stroke_ray.store import StrokeStore

point, root, out = sys.argv[1:4]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("array-write-"):
    n, seen, original = int(point.rsplit("-", 1)[1]), [0], zarr.Array.__setitem__
    def setitem(self, key, value):
        seen[0] += 1
        if seen[0] == n:
            die()
        return original(self, key, value)
    zarr.Array.__setitem__ = setitem
elif point in ("before-switch", "after-switch"):
    switch = StrokeStore._switch
    def killing_switch(holder, version):
        if point == "after-switch":
            switch(holder, version)
        die()
    StrokeStore._switch = staticmethod(killing_switch)
elif point == "during-cleanup":
    delitem = zarr.Group.__delitem__
    def killing_delitem(self, key):
        delitem(self, key)
        die()
    zarr.Group.__delitem__ = killing_delitem
convert_dataset(root, out, levels=[16], normalization="none", parallel=False, progress=False)
print("finished without being killed")
"""

# (kill point, which version must be readable afterwards); a subject is 6 array writes here
# (image, mask, summed-volume table on 2 levels), so array-write-6 dies before its last one.
KILL_POINTS = [("array-write-1", "old"), ("array-write-6", "old"),
               ("before-switch", "old"), ("after-switch", "new"), ("during-cleanup", "new")]


@pytest.mark.parametrize("point, survivor", KILL_POINTS)
def test_reconversion_killed_leaves_old_or_new_subject(tmp_path, point, survivor):
    root, out = tmp_path / "ds", tmp_path / "s.zarr"
    dwi = write_subject(root, "sub-a", seed=0)
    write_subject(root, "sub-b", seed=10)
    assert convert(root, out).converted == 2
    old = StrokeStore.open(str(out)).image("sub-a")[0]
    nib.save(nib.Nifti1Image(volume(99), AFFINE), str(dwi))  # sub-a changes: it is reconverted

    code, stdout, stderr = run_child(KILLING_CONVERT, point, str(root), str(out))
    assert code == -signal.SIGKILL, (code, stdout, stderr)

    store = StrokeStore.open(str(out))
    assert store.subjects() == ["sub-a", "sub-b"]  # never neither
    image = store.image("sub-a")[...]
    expected = old if survivor == "old" else volume(99)
    np.testing.assert_array_equal(image[0], expected)
    assert store.image("sub-a", "16").shape == (3, 16, 16, 16) and store.mask("sub-a")[...].sum() > 0
    assert (out / LOCK_NAME).is_file()  # the killed writer's lock is left behind...

    again = convert(root, out)  # ...and taken over: its pid is gone on this host
    assert again.failed == []
    store = StrokeStore.open(str(out))
    np.testing.assert_array_equal(store.image("sub-a")[0], volume(99))
    holder = store.group["subjects"]["sub-a"]
    assert [name for name, _ in holder.members()] == [holder.attrs["current"]]  # leftovers removed
    assert not (out / LOCK_NAME).exists()


# --- one writer at a time --------------------------------------------------------------------------
PAUSED_CONVERT = r"""
import os, sys, time
from stroke_ray.ingest import convert_dataset
from stroke_ray.store import StrokeStore

root, out, ready, go = sys.argv[1:5]
create = StrokeStore.create.__func__

def paused_create(cls, *args, **kwargs):
    open(ready, "w").close()  # the writer lock is held from here on
    for _ in range(6000):
        if os.path.exists(go):
            break
        time.sleep(0.05)
    return create(cls, *args, **kwargs)

StrokeStore.create = classmethod(paused_create)
report = convert_dataset(root, out, levels=[16], parallel=False, progress=False)
print(report.summary())
"""


def test_two_concurrent_converts_one_succeeds_one_gets_a_clear_line(tmp_path):
    root, out = tmp_path / "ds", tmp_path / "new.zarr"
    write_subject(root, "sub-a", seed=0)
    write_subject(root, "sub-b", seed=10)
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = run_child(PAUSED_CONVERT, str(root), str(out), str(ready), str(go), wait=False)
    try:
        for _ in range(2400):  # the first process holds the lock once `ready` exists
            if ready.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), first.communicate()
        second = subprocess.run(
            [sys.executable, "-m", "stroke_ray", "convert", str(root), "-o", str(out), "--levels", "16",
             "--in-process"], capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    finally:
        go.write_text("")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert "converted 2, skipped 0 (already complete), failed 0" in stdout
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: {out}: being written by another process (convert on host "
                               f"{socket.gethostname()}, pid {first.pid}, since ")
    assert lines[0].endswith("; wait for it to finish")
    assert StrokeStore.open(str(out)).subjects() == ["sub-a", "sub-b"]


def _lock_file(store: Path, **fields) -> None:
    store.mkdir(parents=True, exist_ok=True)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "command": "convert", "started": time.time(),
            "renewed": time.time(), "lease": 300.0, "token": "x", **fields}
    (store / LOCK_NAME).write_text(json.dumps(info))


def test_stale_locks_are_taken_over_and_live_ones_respected(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    cases = {
        "dead-pid-here": (dict(pid=dead_pid), True),
        "other-host-expired": (dict(host="elsewhere", renewed=time.time() - 3600), True),
        "other-host-live": (dict(host="elsewhere"), False),
        "live-pid-here": ({}, False),  # this very process
    }
    for name, (fields, free) in cases.items():
        store = tmp_path / f"{name}.zarr"
        _lock_file(store, **fields)
        if free:
            with writer_lock(str(store)):
                assert json.loads((store / LOCK_NAME).read_text())["pid"] == os.getpid()
            assert not (store / LOCK_NAME).exists()
        else:
            with pytest.raises(StoreBusyError, match="being written by another process"):
                with writer_lock(str(store)):
                    pass
            assert (store / LOCK_NAME).is_file()


def test_lock_on_an_object_store_url():
    url = "memory://store-safety/locked.zarr"
    with writer_lock(url):
        with pytest.raises(StoreBusyError, match="being written by another process"):
            with writer_lock(url):
                pass
    with writer_lock(url):  # released
        pass


# --- outputs that are not ours; store formats -------------------------------------------------------
def test_convert_refuses_a_folder_that_is_not_a_store(tmp_path):
    root = tmp_path / "ds"
    write_subject(root, "sub-a", seed=0)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(StrokeRayError, match="folder is not empty and is not a stroke-ray store"):
        convert(root, theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.attrs["mine"] = True
    with pytest.raises(StrokeRayError, match="a Zarr store that stroke-ray did not make"):
        convert(root, tmp_path / "other.zarr")
    assert dict(zarr.open_group(str(tmp_path / "other.zarr")).attrs) == {"mine": True}


def _format_1_store(path: Path) -> None:
    """A store as format 1 wrote it: levels directly in the subject group, `complete` on it."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update({"format": "stroke-ray", "format_version": 1, "modalities": ["dwi", "adc", "flair"],
                        "reference_modality": "dwi", "levels": ["native", "16"], "normalization": "none"})
    subject = group.require_group("subjects").create_group("sub-a")
    for level, shape in (("native", SHAPE), ("16", (16, 16, 16))):
        lg = subject.create_group(level)
        lg.create_array("image", data=np.full((3, *shape), 7.0, np.float32))
        lg.create_array("mask", data=np.zeros(shape, np.uint8))
    subject.attrs.update({"levels": {"native": {"affine": AFFINE.tolist()}}, "sources": {}, "complete": True})


def test_format_1_store_is_read_in_place_and_upgraded_by_the_first_write(tmp_path):
    out = tmp_path / "old.zarr"
    _format_1_store(out)
    store = StrokeStore.open(str(out))
    assert store.format_version == 1 and store.subjects() == ["sub-a"]
    assert float(store.image("sub-a")[0, 0, 0, 0]) == 7.0
    np.testing.assert_allclose(store.affine("sub-a"), AFFINE)

    root = tmp_path / "ds"
    write_subject(root, "sub-a", seed=0)
    write_subject(root, "sub-b", seed=10)
    assert convert(root, out).converted == 2  # sub-a's recorded sources differ: reconverted
    store = StrokeStore.open(str(out))
    assert store.format_version == FORMAT_VERSION == 2
    np.testing.assert_array_equal(store.image("sub-a")[0], volume(0))
    holder = store.group["subjects"]["sub-a"]
    assert dict(holder.attrs) == {"current": holder.attrs["current"]}  # format-1 levels and attrs gone
    assert [name for name, _ in holder.members()] == [holder.attrs["current"]]


def test_a_newer_format_is_refused_with_one_line(tmp_path):
    out = tmp_path / "new.zarr"
    store = StrokeStore.create(str(out), ["dwi"], ["native"])
    store.write_subject("sub-a", {"native": LevelArrays(volume(0)[None], np.zeros(SHAPE, np.uint8), AFFINE)}, {})
    store.group.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match=f"store format version {FORMAT_VERSION + 1} is newer than this "
                                         f"stroke-ray understands \\({FORMAT_VERSION}\\); upgrade stroke-ray"):
        StrokeStore.open(str(out))
