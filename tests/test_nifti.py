"""Header-first NIfTI reading: every header check, capped decoding, bounded memory."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stroke_ray.errors import ConfigError, InputFileError
from stroke_ray.nifti import GIB, ImageLimits, check_header, read_nifti_bytes, read_nifti_file

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def header_for(shape, dtype=np.float32, affine=AFFINE, qform=1, sform=1) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    if qform:  # nibabel cannot store a singular matrix as a quaternion
        header.set_qform(affine, code=qform)
    header.set_sform(affine, code=sform)
    header.set_data_offset(352)
    return header


def nifti_stream(header: nib.Nifti1Header, payload: bytes) -> bytes:
    """A single-file NIfTI-1 stream: header, empty extension flag, then `payload`."""
    return header.binaryblock + b"\0" * 4 + payload


def image_bytes(data: np.ndarray, affine=AFFINE, compress=True) -> bytes:
    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


def test_reads_the_real_case_exactly_as_nibabel(isles_sample):
    for path in sorted(isles_sample.rglob("*.nii.gz")):
        read = read_nifti_file(path)
        reference = nib.load(path)
        np.testing.assert_array_equal(read.data, np.asarray(reference.dataobj))
        np.testing.assert_allclose(read.affine, reference.affine)
        assert read.on_disk_dtype == str(reference.get_data_dtype())
        assert read.image.header["sform_code"] == reference.header["sform_code"]
        assert read.image.header["qform_code"] == reference.header["qform_code"]
        assert len(read.sha256) == 64


@pytest.mark.parametrize("compress", [True, False])
def test_bytes_and_file_agree(tmp_path, compress):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    blob = image_bytes(data[..., None], compress=compress)  # a trailing singleton axis
    path = tmp_path / ("a.nii.gz" if compress else "a.nii")
    path.write_bytes(blob)
    for read in (read_nifti_file(path), read_nifti_bytes(blob, "upload")):
        assert read.data.shape == (4, 5, 6)
        np.testing.assert_array_equal(read.data, data)
        np.testing.assert_allclose(read.affine, AFFINE)


def test_scaling_big_endian_and_concatenated_gzip_members():
    header = header_for((3, 4, 5), np.int16).as_byteswapped(">")
    header.set_slope_inter(2.0, 1.0)
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    stream = nifti_stream(header, data.astype(">i2").tobytes(order="F"))
    # Two gzip members plus zero padding: what `cat a.gz b.gz` and some tools produce.
    blob = gzip.compress(stream[:500], mtime=0) + gzip.compress(stream[500:], mtime=0) + b"\0" * 8
    read = read_nifti_bytes(blob, "scaled")
    assert read.data.dtype == np.float32
    np.testing.assert_array_equal(read.data, data * 2.0 + 1.0)


BAD_HEADERS = {
    "2d": (dict(shape=(8, 8)), "2D image of shape \\(8, 8\\); a 3D volume is expected"),
    "4d": (dict(shape=(8, 8, 8, 3)), "4D image with 3 volumes; a 3D volume is expected"),
    "5d": (dict(shape=(8, 8, 8, 1, 2)), "5D image of shape"),
    "too-wide": (dict(shape=(1025, 8, 8)), "larger than the limit of 1024 voxels per axis"),
    "too-many-bytes": (dict(shape=(1024, 1024, 512), dtype=np.float64),
                       "decodes to 4 GiB, more than the limit of 2 GiB per image"),
    "complex": (dict(shape=(8, 8, 8), dtype=np.complex64), "unsupported voxel type complex64"),
    "no-orientation": (dict(shape=(8, 8, 8), qform=0, sform=0), "no orientation: qform_code and sform_code are both 0"),
    "tiny-voxels": (dict(shape=(8, 8, 8), affine=np.diag([0.05, 1, 1, 1])), "voxel size 0.05 x 1 x 1 mm is outside"),
    "huge-voxels": (dict(shape=(8, 8, 8), affine=np.diag([1, 1, 25, 1])), "voxel size 1 x 1 x 25 mm is outside"),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_bad_header_is_refused_before_any_voxel(name):
    kwargs, message = BAD_HEADERS[name]
    header = header_for(**kwargs)
    with pytest.raises(InputFileError, match=message) as info:
        check_header(header, "x.nii.gz")
    assert info.value.path == "x.nii.gz"
    # The same header with no voxel data at all: refused for the same reason, not for
    # being truncated, so the check really came first.
    with pytest.raises(InputFileError, match=message):
        read_nifti_bytes(gzip.compress(nifti_stream(header, b"")), "upload")


def test_limits_are_configurable_and_validated():
    header = header_for((300, 300, 300), np.float32)  # 103 MB of voxels
    with pytest.raises(InputFileError, match="more than the limit of 95.4 MiB"):
        check_header(header, "x", ImageLimits(max_decoded_bytes=100_000_000))
    with pytest.raises(InputFileError, match="limit of 256 voxels per axis"):
        check_header(header, "x", ImageLimits(max_dim=256))
    assert check_header(header, "x", ImageLimits(max_dim=300)).data_bytes == 300**3 * 4
    limits = ImageLimits.from_cli(max_dim=512, max_image_gib=0.5, voxel_range_mm="0.2,10")
    assert limits == ImageLimits(512, GIB // 2, 0.2, 10.0)
    for bad in (dict(max_dim=0), dict(min_voxel_mm=0.0), dict(min_voxel_mm=5.0, max_voxel_mm=1.0)):
        with pytest.raises(ConfigError):
            ImageLimits(**bad)
    with pytest.raises(ConfigError, match="--voxel-range-mm must be MIN,MAX"):
        ImageLimits.from_cli(1024, 2, "small")


def test_bad_streams_each_get_one_line(tmp_path):
    data = np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32)  # incompressible
    good = image_bytes(data, compress=False)
    cases = {
        "empty": (b"", "empty file"),
        "garbage": (b"not a nifti at all" * 30, "not a readable NIfTI image"),
        "garbage-gzip": (gzip.compress(b"not a nifti at all" * 30), "not a readable NIfTI image \\(the gzip stream"),
        "short-header": (gzip.compress(good[:200]), "truncated NIfTI header"),
        "truncated-plain": (good[:-10], "truncated image data: the stream ends after 2390 of the 2400 bytes"),
        "truncated-gzip": (gzip.compress(good)[:-40], "truncated image data: the stream ends after"),
        "no-gzip-trailer": (gzip.compress(good)[:-8], "truncated gzip stream: its end marker and checksum are missing"),
        "bad-crc": (gzip.compress(good)[:-8] + b"\0" * 8, "corrupt gzip data"),
        "trailing-junk": (gzip.compress(good) + b"junk", "unexpected bytes after the end"),
        "longer-plain": (good + b"\0" * 16, "longer than the 2400 bytes its header promises"),
        "pair-header": (nifti_stream(_pair_header(), b""), "not a single-file NIfTI image"),
    }
    for name, (blob, message) in cases.items():
        path = tmp_path / f"{name}.nii.gz"
        path.write_bytes(blob)
        with pytest.raises(InputFileError, match=message) as info:
            read_nifti_file(path)
        assert info.value.path == str(path), name
        with pytest.raises(InputFileError, match=message):
            read_nifti_bytes(blob, name)
    with pytest.raises(InputFileError, match="file does not exist"):
        read_nifti_file(tmp_path / "nothing.nii.gz")


def _pair_header() -> nib.Nifti1Header:
    header = nib.Nifti1Pair(np.zeros((2, 2, 2), np.float32), AFFINE).header
    return header


def test_bad_affine_reported_only_when_allowed():
    bad = AFFINE.copy()
    bad[2, 2] = 0.0
    header = header_for((8, 8, 8), np.uint8, affine=bad, qform=0, sform=2)
    with pytest.raises(InputFileError, match="degenerate affine"):
        check_header(header, "m")
    assert "degenerate affine" in check_header(header, "m", allow_bad_affine=True).affine_problem


# --- memory: a real subprocess measures its own peak RSS ----------------------------------------
_MEASURE = r"""
import gzip, json, sys
from stroke_ray.nifti import read_nifti_bytes, read_nifti_file
from stroke_ray.errors import InputFileError

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    # Linux resets VmHWM to the current RSS on "5" (since 4.0); where that is not allowed
    # the growth is measured against the current RSS, which can only overstate it.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass

path, mode = sys.argv[1], sys.argv[2]
blob = open(path, "rb").read() if mode != "file" else None
read_nifti_bytes(open(sys.argv[3], "rb").read(), "warm-up")  # imports and first-use allocations
reset_peak()
before = status("VmRSS")
try:
    if mode == "gzip.decompress":  # the unbounded way, to show the measurement sees it
        gzip.decompress(blob)
    else:
        read_nifti_bytes(blob, "upload") if mode == "bytes" else read_nifti_file(path)
    outcome = "accepted"
except InputFileError as exc:
    outcome = str(exc)
print(json.dumps({"growth": status("VmHWM") - before, "outcome": outcome}))
"""


def _peak_growth(path: Path, mode: str, warm_up: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode, str(warm_up)],
                         capture_output=True, text=True, timeout=120, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["growth"], result["outcome"]


BOMB_BYTES = 200 * 1024**2


def _gzip_of_zeros(prefix: bytes, zeros: int) -> bytes:
    """gzip of `prefix` + `zeros` zero bytes, written piecewise so the test stays small."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [comp.compress(prefix)]
    block = b"\0" * (8 << 20)
    for _ in range(zeros // len(block)):
        parts.append(comp.compress(block))
    parts.append(comp.compress(b"\0" * (zeros % len(block))))
    parts.append(comp.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()  # incompressible: 1 MB of gzip
    files = {
        # 1 MB of gzip whose header declares 1024 x 1024 x 512 float64 (4 GiB): over the limit.
        "declares-4gib": gzip.compress(nifti_stream(header_for((1024, 1024, 512), np.float64), noise), 1),
        # The same dimensions in int16 (1 GiB, within the limits) but only 1 MB of data.
        "declares-1gib-truncated": gzip.compress(nifti_stream(header_for((1024, 1024, 512), np.int16), noise), 1),
        # A bomb: the header promises 32^3 bytes, the stream decodes to 200 MiB of zeros (twice
        # the 100 MB bound, a 0.2 MB file; bigger bombs only make the test slower).
        "bomb": _gzip_of_zeros(nifti_stream(header_for((32, 32, 32), np.uint8), b""), BOMB_BYTES),
        "warm-up": gzip.compress(nifti_stream(header_for((8, 8, 8), np.uint8), b"\1" * 512)),
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = root / f"{name}.nii.gz"
        paths[name].write_bytes(blob)
    return paths


EXPECTED = {
    "declares-4gib": "decodes to 4 GiB, more than the limit of 2 GiB",
    "declares-1gib-truncated": "truncated",
    "bomb": "longer than the 33120 bytes its header promises",
}


@pytest.mark.parametrize("mode", ["file", "bytes"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_gzip_refused_with_bounded_memory(hostile_files, name, mode):
    path = hostile_files[name]
    assert path.stat().st_size < 1.1e6  # each is a small file
    growth, outcome = _peak_growth(path, mode, hostile_files["warm-up"])
    assert EXPECTED[name] in outcome, outcome
    assert outcome.startswith("upload: " if mode == "bytes" else f"{path}: ")
    # The bytes mode holds the 1 MB upload itself; nothing else may grow by 100 MB.
    assert growth < 100 * 1024**2, f"peak RSS grew by {growth / 1024**2:.1f} MiB"


def test_the_measurement_sees_an_unbounded_decompression(hostile_files):
    growth, outcome = _peak_growth(hostile_files["bomb"], "gzip.decompress", hostile_files["warm-up"])
    assert outcome == "accepted"
    assert growth > BOMB_BYTES, f"gzip.decompress of the bomb grew only {growth / 1024**2:.1f} MiB"
