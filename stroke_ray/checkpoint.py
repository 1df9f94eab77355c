"""One self-describing checkpoint file per saved model.

`checkpoint.pt` is a single `torch.save` dict of tensors and plain Python values (the model
state, the optimizer state, the epoch, the whole `TrainConfig` as JSON-able dict, the input
modalities and the store's normalisation), so that `torch.load(weights_only=True)` opens it
without unpickling arbitrary objects and prediction can rebuild the exact model from the
file alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stroke_ray.config import TrainConfig
from stroke_ray.errors import InputFileError
from stroke_ray.files import atomic_path
from stroke_ray.models import build_model, inference_state_dict
from stroke_ray.postprocess import Postprocessing

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "checkpoint_file",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "unwrap",
    "LoadedModel",
]

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
_REQUIRED = ("format", "model", "epoch", "config", "modalities", "normalization")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DistributedDataParallel / compiled wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _plain(value: Any) -> Any:
    """Metrics as floats/ints/strings only, so weights_only loading accepts them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int,
    config: TrainConfig,
    modalities: list[str],
    normalization: str,
    metrics: dict | None = None,
    postprocessing: Postprocessing | None = None,
) -> Path:
    """Write `<directory>/checkpoint.pt` atomically and return its path.

    `postprocessing` (threshold and minimum lesion size chosen on validation cases) is
    stored with the weights; None = no removal when the model is used.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "config": config.model_dump(mode="json"),
        "modalities": [str(m) for m in modalities],
        "normalization": str(normalization),
        "metrics": _plain(dict(metrics or {})),
        "postprocessing": postprocessing.to_dict() if postprocessing is not None else None,
    }
    path = directory / CHECKPOINT_FILE
    # Write beside and rename, so a crash never leaves a truncated checkpoint behind.
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode, with what is needed to use it."""

    model: torch.nn.Module
    config: TrainConfig
    modalities: list[str]
    normalization: str
    epoch: int
    metrics: dict = field(default_factory=dict)
    optimizer_state: dict | None = None
    postprocessing: Postprocessing = field(default_factory=Postprocessing)


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file for `path` (the file itself, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise InputFileError(path, "no such checkpoint file")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, loaded with weights_only=True; clear error if unreadable."""
    path = checkpoint_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbage files
        raise InputFileError(path, f"not a readable stroke-ray checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if not isinstance(payload, dict) or any(k not in payload for k in _REQUIRED):
        raise InputFileError(path, "not a stroke-ray checkpoint (missing model/config entries)")
    if int(payload["format"]) > CHECKPOINT_FORMAT:
        raise InputFileError(
            path, f"checkpoint format {payload['format']} is newer than this stroke-ray understands"
        )
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model stored in a checkpoint file (or a directory holding checkpoint.pt)."""
    file = checkpoint_file(path)
    payload = read_checkpoint(file)
    config = TrainConfig.from_dict(payload["config"], source=str(file))
    # Deep-supervision heads only shape training: the loaded model has none.
    model = build_model(config.model, in_channels=len(payload["modalities"]), for_inference=True)
    try:
        model.load_state_dict(inference_state_dict(payload["model"]))
    except RuntimeError as exc:
        raise InputFileError(file, f"weights do not fit the model in its config ({exc})".splitlines()[0]) from exc
    model.to(device).eval()
    return LoadedModel(
        model=model,
        config=config,
        modalities=list(payload["modalities"]),
        normalization=str(payload["normalization"]),
        epoch=int(payload["epoch"]),
        metrics=dict(payload.get("metrics") or {}),
        optimizer_state=payload.get("optimizer"),
        postprocessing=_postprocessing(file, payload.get("postprocessing")),
    )


def _postprocessing(file: Path, raw: Any) -> Postprocessing:
    """The stored postprocessing (none stored = threshold 0.5, no removal); bad values name the file."""
    try:
        return Postprocessing.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputFileError(file, f"bad postprocessing entry {raw!r} ({exc})") from exc
