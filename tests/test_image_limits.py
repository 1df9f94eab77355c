"""The image-limit options reach the reader in every command: convert, predict and serve."""

from __future__ import annotations

import gzip
import re
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from helpers import make_checkpoint
from typer.testing import CliRunner

from stroke_ray.cli import app
from stroke_ray.errors import ConfigError
from stroke_ray.nifti import GIB, ImageLimits
from stroke_ray.store import StrokeStore
from stroke_ray.uploads import MAX_DECODE_RATIO, UPLOAD_IMAGE_LIMITS, UploadError, read_nifti

SHAPE = (12, 12, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])

# Each option set tight enough to refuse the small images above, and the line it gives.
TIGHT = {
    "--max-dim": (["--max-dim", "8"], r"image of shape \(12, 12, 10\) is larger than the limit of 8 voxels per axis"),
    "--max-image-gib": (["--max-image-gib", "1e-6"],
                        r"image of shape \(12, 12, 10\) \(float32\) decodes to .* more than the limit of"),
    "--voxel-range-mm": (["--voxel-range-mm", "0.5,1"], "voxel size 2 x 2 x 2 mm is outside the allowed 0.5-1 mm"),
}


def head(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """A noisy sphere: a small image every default limit accepts."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return ((x**2 + y**2 + z**2 < 0.8) * (100 + 10 * rng.standard_normal(shape))).astype(np.float32)


def save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def make_case(root: Path, sub: str = "sub-a") -> dict[str, Path]:
    """One ISLES'22 rawdata/ subject of small images; {modality: file} plus its mask."""
    raw = root / "rawdata" / sub / "ses-1"
    files = {m: save(raw / f"{sub}_ses-1_{m}.nii.gz", head(seed=i)) for i, m in enumerate(["dwi", "adc", "flair"])}
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:8, 4:8, 3:7] = 1
    files["mask"] = save(root / "derivatives" / sub / "ses-1" / f"{sub}_ses-1_msk.nii.gz", mask)
    return files


def error_lines(output: str, marker: str) -> list[str]:
    return [line for line in output.replace("\r", "\n").splitlines() if marker in line]


# --- convert and predict ------------------------------------------------------------------------
@pytest.mark.parametrize("option", sorted(TIGHT))
def test_convert_limit_options_reach_the_reader(tmp_path, option):
    root = tmp_path / "ds"
    files = make_case(root)
    args, problem = TIGHT[option]
    runner = CliRunner()
    out = str(tmp_path / "tight.zarr")
    result = runner.invoke(app, ["convert", str(root), "-o", out, "--levels", "16", "--spacing", "", "--in-process",
                                 *args])
    assert result.exit_code == 1, result.output
    assert "converted 0, skipped 0 (already complete), failed 1" in result.output
    mine = error_lines(result.output, "sub-a: ")
    assert len(mine) == 1 and mine[0].startswith(f"sub-a: {files['dwi']}: "), result.output
    assert re.search(problem, mine[0]), mine[0]
    # The same images convert under the default limits: the option made the difference.
    result = runner.invoke(app, ["convert", str(root), "-o", str(tmp_path / "default.zarr"), "--levels", "16",
                                 "--spacing", "", "--in-process"])
    assert result.exit_code == 0, result.output
    assert StrokeStore.open(str(tmp_path / "default.zarr")).subjects() == ["sub-a"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("option", sorted(TIGHT))
def test_predict_limit_options_reach_the_reader(tmp_path, checkpoint, option):
    files = make_case(tmp_path / "ds")
    args, problem = TIGHT[option]
    result = CliRunner().invoke(app, [
        "predict", "--dwi", str(files["dwi"]), "--adc", str(files["adc"]), "--flair", str(files["flair"]),
        "-o", str(tmp_path / "out"), "-m", str(checkpoint), "--no-tta", *args,
    ])
    assert result.exit_code == 1, result.output
    mine = error_lines(result.output, "failed: ")
    assert len(mine) == 1 and f"{files['dwi']}: " in mine[0], result.output
    assert re.search(problem, mine[0]), mine[0]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


# --- serve --------------------------------------------------------------------------------------
@pytest.fixture()
def started(monkeypatch):
    """`stroke-ray serve` run to its first second: what it asked `start_server` for."""
    import stroke_ray.service as service

    calls: list[dict] = []
    monkeypatch.setattr(service, "start_server", lambda model, **kw: calls.append(kw) or "http://127.0.0.1:1")
    monkeypatch.setattr(service, "stop_server", lambda *a, **kw: None)

    def interrupt(_seconds):
        raise KeyboardInterrupt  # the serve loop's Ctrl-C, at its first sleep

    monkeypatch.setattr(time, "sleep", interrupt)
    monkeypatch.delenv("STROKE_RAY_SERVE_TOKEN_FILE", raising=False)
    monkeypatch.delenv("STROKE_RAY_SERVE_TOKEN", raising=False)

    def run(*args: str) -> dict:
        result = CliRunner().invoke(app, ["serve", "-m", "checkpoint.pt", *args])
        assert result.exit_code == 0, result.output
        return calls[-1]

    return run


def test_serve_limit_options_reach_start_server(started):
    default = started()
    # Serving keeps its own, smaller defaults, not convert's 2 GiB.
    assert default["image_limits"] == UPLOAD_IMAGE_LIMITS
    assert default["image_limits"].max_decoded_bytes == 256 * 1024**2
    assert default["max_decode_ratio"] == MAX_DECODE_RATIO
    given = started("--max-dim", "64", "--max-image-gib", "0.5", "--voxel-range-mm", "0.5,5",
                    "--max-decode-ratio", "50")
    assert given["image_limits"] == ImageLimits(max_dim=64, max_decoded_bytes=GIB // 2, min_voxel_mm=0.5,
                                                max_voxel_mm=5.0)
    assert given["max_decode_ratio"] == 50


def test_serve_refuses_bad_limits_in_one_line():
    result = CliRunner().invoke(app, ["serve", "-m", "checkpoint.pt", "--voxel-range-mm", "5,0.5"])
    assert result.exit_code == 2
    assert "voxel size range must satisfy 0 < min <= max" in result.output and "Traceback" not in result.output


def test_start_server_hands_its_limits_to_the_replicas(monkeypatch):
    """start_server -> ReplicaSettings -> the plain dict a deployment carries -> the replica's settings."""
    import stroke_ray.service as service
    from stroke_ray.serving import ReplicaSettings

    built: list[ReplicaSettings] = []
    monkeypatch.setattr(service, "resolve_checkpoint", lambda *a: None)
    monkeypatch.setattr(service, "connect", lambda *a: None)
    monkeypatch.setattr(service, "serve", SimpleNamespace(start=lambda **kw: None, run=lambda *a, **kw: None))
    monkeypatch.setattr(service, "register_rule", lambda *a: None)
    monkeypatch.setattr(service, "_wait_for_guard", lambda *a: True)
    monkeypatch.setattr(service, "build_app", lambda ref, settings, **kw: built.append(settings))

    tight = ImageLimits(max_dim=64, max_decoded_bytes=1 << 20, min_voxel_mm=0.5, max_voxel_mm=5.0)
    service.start_server("checkpoint.pt", image_limits=tight, max_decode_ratio=3)
    service.start_server("checkpoint.pt")
    assert (built[0].image_limits, built[0].max_decode_ratio) == (tight, 3.0)
    assert (built[1].image_limits, built[1].max_decode_ratio) == (UPLOAD_IMAGE_LIMITS, MAX_DECODE_RATIO)
    for settings in built:
        assert ReplicaSettings.from_dict(asdict(settings)) == settings
    with pytest.raises(ConfigError, match="--max-decode-ratio must be at least 1, got 0.5"):
        service.start_server("checkpoint.pt", max_decode_ratio=0.5)


def _segment(settings, data: bytes):
    """A replica's checks of one upload under `settings` (the replica's own code, no Serve)."""
    from stroke_ray.serving import ReplicaSettings, StrokeSegmenter

    replica = SimpleNamespace(settings=ReplicaSettings.from_dict(asdict(settings)))
    segmenter = SimpleNamespace(modalities=["dwi"])
    return StrokeSegmenter.func_or_class._segment(replica, segmenter, {"dwi": ("dwi.nii.gz", data)})


def test_a_replica_refuses_what_its_limits_refuse_and_the_defaults_accept():
    from stroke_ray.serving import ReplicaSettings

    data = gzip.compress(nib.Nifti1Image(head((96, 96, 8)), AFFINE).to_bytes())
    # The default upload limits accept the image ...
    assert read_nifti("dwi", data, UPLOAD_IMAGE_LIMITS).data.shape == (96, 96, 8)
    # ... a replica given a smaller --max-dim refuses it before decoding, naming the field,
    with pytest.raises(UploadError) as info:
        _segment(ReplicaSettings(image_limits=ImageLimits(max_dim=64)), data)
    assert info.value.status == 400 and info.value.field == "dwi"
    assert str(info.value) == "dwi: image of shape (96, 96, 8) is larger than the limit of 64 voxels per axis"
    # ... and one given a tight --max-decode-ratio takes it for a bomb.
    with pytest.raises(UploadError) as info:
        _segment(ReplicaSettings(max_decode_ratio=1.0), data)
    assert info.value.status == 413 and info.value.field == "dwi"
    assert info.value.problem.endswith(f"or 1x the upload's {len(data)} bytes")
