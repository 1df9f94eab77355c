"""`stroke-ray export`: ONNX and TorchScript give PyTorch's probabilities on the real sample case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import case_files, make_checkpoint
from typer.testing import CliRunner

from stroke_ray.checkpoint import load_checkpoint
from stroke_ray.cli import app
from stroke_ray.errors import ConfigError
from stroke_ray.export import ProbabilityModel, export_model
from stroke_ray.grid import cube_affine, resample
from stroke_ray.inference import normalise_case
from stroke_ray.ingest import load_case

# float32 through different kernels (oneDNN in torch, MLAS in onnxruntime): probabilities
# agree to a few 1e-6; 1e-4 absolute leaves room for other CPUs without hiding a wrong graph
# (a dropped layer or a wrong head moves them by 1e-2 or more).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def sample_input(isles_sample, tmp_path_factory):
    """The real case on its 32^3 training level, normalised as prediction does; and a checkpoint."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("export-ckpt"), level="32", patch=32)
    case = load_case(case_files(isles_sample), subject="sub-strokecase0009")
    shape = case.image.shape[1:]
    level = cube_affine(shape, case.affine, 32)
    image = np.stack([resample(c, case.affine, (32, 32, 32), level) for c in case.image])
    image = normalise_case(image, case.attrs, "zscore")[None]
    loaded = load_checkpoint(checkpoint)
    with torch.no_grad():
        expected = ProbabilityModel(loaded.model).eval()(torch.from_numpy(image)).numpy()
    return checkpoint, image, expected


def test_onnx_export_gives_pytorch_probabilities_under_onnxruntime(sample_input, tmp_path):
    import onnxruntime

    checkpoint, image, expected = sample_input
    result = export_model(checkpoint, tmp_path / "model.onnx", "onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run([result.output_name], {result.input_name: image})
    assert got.shape == expected.shape == (1, 1, 32, 32, 32)
    assert np.abs(got - expected).max() <= TOLERANCE
    # Dynamic batch and spatial size: two cases of another multiple of the size multiple.
    bigger = np.concatenate([np.pad(image, ((0, 0), (0, 0), (0, 16), (0, 0), (0, 8)))] * 2)
    (got2,) = session.run([result.output_name], {result.input_name: bigger})
    assert got2.shape == (2, 1, 48, 32, 40)
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["modalities"] == ["dwi", "adc", "flair"] and sidecar["normalization"] == "zscore"
    assert sidecar["size_multiple"] == 4 and sidecar["level"] == "32"


def test_torchscript_export_gives_pytorch_probabilities(sample_input, tmp_path):
    checkpoint, image, expected = sample_input
    result = export_model(checkpoint, tmp_path / "model.pt", "torchscript")
    scripted = torch.jit.load(result.path)
    with torch.no_grad():
        got = scripted(torch.from_numpy(image)).numpy()
    assert np.abs(got - expected).max() <= TOLERANCE


def test_cli_export_and_a_bad_format(sample_input, tmp_path):
    checkpoint, _, _ = sample_input
    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(checkpoint), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m.onnx").stat().st_size > 0 and "channels dwi, adc, flair" in ok.output
    bad = runner.invoke(app, ["export", str(checkpoint), "--format", "tflite", "-o", str(tmp_path / "m.x")])
    assert bad.exit_code == 2 and "'tflite' is not one of onnx, torchscript" in bad.output
    assert not (tmp_path / "m.x").exists()
    with pytest.raises(ConfigError):
        export_model(checkpoint, tmp_path / "y", "keras")
