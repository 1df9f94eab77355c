"""The image-limit options reach the reader in every command: convert, predict and serve."""

from __future__ import annotations

import gzip
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from helpers import make_checkpoint
from typer.testing import CliRunner

from stroke_ray.cli import app
from stroke_ray.nifti import ImageLimits
from stroke_ray.store import StrokeStore
from stroke_ray.uploads import UPLOAD_IMAGE_LIMITS, UploadError, read_nifti

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
def test_serve_refuses_bad_limits_in_one_line():
    result = CliRunner().invoke(app, ["serve", "-m", "checkpoint.pt", "--voxel-range-mm", "5,0.5"])
    assert result.exit_code == 2
    assert "voxel size range must satisfy 0 < min <= max" in result.output and "Traceback" not in result.output


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
