"""Export a trained model to ONNX or TorchScript, for use outside stroke-ray.

The exported graph is the eval-mode network of the checkpoint (`checkpoint.load_checkpoint`,
whatever module it holds) followed by the same foreground-probability head that
`stroke-ray predict` blends (`inference.foreground_probability`): input a normalised patch
`image` of shape (B, C, X, Y, Z), output `probability` of shape (B, 1, X, Y, Z). Batch and
spatial sizes are dynamic; each spatial size must be a multiple of the network's size
multiple. A sidecar `<file>.json` records what a caller needs to feed it: the modalities in
channel order, the normalisation, the training level and patch size, the size multiple.

ONNX goes through `torch.onnx.export`'s TorchScript-based exporter (opset 17; it needs only
the `onnx` package, where the newer exporter also needs `onnxscript`), TorchScript through
`torch.jit.trace`. Both files are written whole or not at all.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stroke_ray.checkpoint import load_checkpoint
from stroke_ray.errors import ConfigError
from stroke_ray.files import atomic_path, atomic_write_text
from stroke_ray.inference import foreground_probability, window_size
from stroke_ray.model_ref import pin_version, resolve_checkpoint, version_label
from stroke_ray.models import size_multiple

__all__ = ["FORMATS", "ONNX_OPSET", "ExportedModel", "ProbabilityModel", "export_model"]

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "probability"


class ProbabilityModel(torch.nn.Module):
    """A segmentation network followed by its foreground probability (what gets exported)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return foreground_probability(self.network(image))


@dataclass
class ExportedModel:
    """What was written, and how to feed it (also the sidecar JSON)."""

    path: str
    format: str
    model: str
    model_version: str
    modalities: list[str]
    normalization: str
    level: str
    patch_size: list[int]
    size_multiple: int
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_layout: str = "(batch, channel=modality, x, y, z), float32, normalised"
    output_layout: str = "(batch, 1, x, y, z), float32 foreground probability"


def export_model(model: str | Path, output: str | Path, fmt: str = "onnx", tracking_uri: str | None = None) -> ExportedModel:
    """Export the model named by `model` (any model reference) to `output`.

    Args:
        model: a checkpoint file or folder, `runs:/...` or `models:/...`.
        output: the file to write (`.onnx` or `.pt` by convention); a sidecar `<output>.json`
            is written beside it.
        fmt: "onnx" or "torchscript".
        tracking_uri: the MLflow store for `runs:/` and `models:/` references.

    Raises:
        ConfigError: an unknown format.
        StrokeRayError: a model reference that does not resolve to a checkpoint.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    # The alias is read once: the weights exported and the version named are the same.
    pinned = pin_version(model, tracking_uri)
    checkpoint = resolve_checkpoint(pinned, tracking_uri)
    loaded = load_checkpoint(checkpoint, device="cpu")
    cfg = loaded.config
    multiple = size_multiple(cfg.model)
    window = window_size(cfg.data.patch_size, multiple)
    wrapped = ProbabilityModel(loaded.model).eval()
    example = torch.zeros(1, len(loaded.modalities), *window)
    output = Path(output)
    with torch.no_grad(), warnings.catch_warnings():
        # The size check in the network's forward is a Python branch on shapes: tracing
        # records it as "valid", which every multiple of the size multiple is.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        with atomic_path(output) as tmp:
            if fmt == "onnx":
                spatial = {0: "batch", 2: "x", 3: "y", 4: "z"}
                torch.onnx.export(
                    wrapped, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: spatial, OUTPUT_NAME: spatial},
                )
            else:
                traced = torch.jit.trace(wrapped, (example,), check_trace=False)
                torch.jit.save(traced, str(tmp))
    result = ExportedModel(
        path=str(output), format=fmt, model=str(model), model_version=version_label(pinned, checkpoint, tracking_uri),
        modalities=list(loaded.modalities), normalization=loaded.normalization, level=cfg.data.level,
        patch_size=list(window), size_multiple=multiple,
    )
    atomic_write_text(output.with_name(output.name + ".json"), json.dumps(asdict(result), indent=2) + "\n")
    return result
