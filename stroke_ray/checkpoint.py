"""One self-describing checkpoint file per saved model.

`checkpoint.pt` is a single `torch.save` dict of tensors and plain Python values (the model
state, the optimizer state, the epoch, the whole `TrainConfig` as JSON-able dict, the input
modalities and the store's normalisation), so that `torch.load(weights_only=True)` opens it
without unpickling arbitrary objects and prediction can rebuild the exact model from the
file alone.

An ensemble (`save_ensemble`, e.g. the fold models of a cross-validation) is one such file
too: format 2, the members' weights under `members.<i>.` in one state dict (the state dict
of `ensemble.Ensemble`), one shared config, and `ensemble: {members, sources, epochs}`.
`load_checkpoint` returns it as one network, so everything that uses a model uses an
ensemble the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from stroke_ray.config import TrainConfig
from stroke_ray.ensemble import Ensemble
from stroke_ray.errors import InputFileError
from stroke_ray.files import CHECKPOINT_FILE, atomic_path
from stroke_ray.models import build_model, inference_state_dict
from stroke_ray.postprocess import Postprocessing

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "ENSEMBLE_FORMAT",
    "checkpoint_file",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "save_ensemble",
    "unwrap",
    "LoadedModel",
]

CHECKPOINT_FORMAT = 1  # one network
ENSEMBLE_FORMAT = 2  # several networks whose probabilities are averaged
NEWEST_FORMAT = ENSEMBLE_FORMAT  # the newest format this version reads
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
    members: int = 1  # > 1: an ensemble.Ensemble of that many networks


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
    if int(payload["format"]) > NEWEST_FORMAT:
        raise InputFileError(
            path, f"checkpoint format {payload['format']} is newer than this stroke-ray understands"
        )
    return payload


def _network(config: TrainConfig, in_channels: int, state: dict, file: Path) -> torch.nn.Module:
    """One network of `config` with the weights `state`; a mismatch names the file."""
    # Deep-supervision heads only shape training: the loaded model has none.
    model = build_model(config.model, in_channels=in_channels, for_inference=True)
    try:
        model.load_state_dict(inference_state_dict(state))
    except RuntimeError as exc:
        raise InputFileError(file, f"weights do not fit the model in its config ({exc})".splitlines()[0]) from exc
    return model


def _member_states(file: Path, state: dict, count: int) -> list[dict]:
    """An ensemble's state dict split into its members' (`members.<i>.<key>`)."""
    states: list[dict] = [{} for _ in range(count)]
    for key, value in state.items():
        head, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if head != "members" or not index.isdigit() or int(index) >= count:
            raise InputFileError(file, f"ensemble weight {key!r} belongs to no member of {count}")
        states[int(index)][name] = value
    return states


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model (or ensemble) stored in a checkpoint file or a directory holding one.

    The stored config is read with `TrainConfig.from_stored`: checkpoints written before a
    config key was renamed load with it under its new name.

    Raises:
        InputFileError: the file is missing, unreadable, not a checkpoint, or its weights do
            not fit its config.
    """
    file = checkpoint_file(path)
    payload = read_checkpoint(file)
    config = TrainConfig.from_stored(payload["config"], source=str(file))
    in_channels = len(payload["modalities"])
    members = int((payload.get("ensemble") or {}).get("members", 1))
    if payload.get("ensemble"):
        states = _member_states(file, payload["model"], members)
        model = Ensemble([_network(config, in_channels, state, file) for state in states])
    else:
        model = _network(config, in_channels, payload["model"], file)
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
        members=members,
    )


def save_ensemble(
    directory: str | Path,
    checkpoints: Sequence[str | Path],
    *,
    metrics: dict | None = None,
    postprocessing: Postprocessing | None = None,
) -> Path:
    """Write the networks of `checkpoints` as one ensemble `<directory>/checkpoint.pt`.

    The members must be one kind of model for one kind of input: the same `model` config,
    training level, patch size, modalities and normalisation (as the fold models of one
    configuration are). The first member's config is the ensemble's.

    Raises:
        InputFileError: a checkpoint is unreadable, already an ensemble, or differs from the
            first in one of those respects.
    """
    files = [checkpoint_file(c) for c in checkpoints]
    if not files:
        raise ValueError("an ensemble needs at least one checkpoint")
    payloads = [read_checkpoint(f) for f in files]
    first = payloads[0]

    def shape(p: dict) -> dict:
        data = p["config"].get("data", {})
        return {"model": p["config"].get("model"), "data.level": data.get("level"),
                "data.patch_size": data.get("patch_size"), "modalities": p["modalities"],
                "normalization": p["normalization"]}

    for file, p in zip(files, payloads):
        if p.get("ensemble"):
            raise InputFileError(file, "is already an ensemble; give its members' checkpoints instead")
        differs = [k for k, v in shape(p).items() if v != shape(first)[k]]
        if differs:
            raise InputFileError(file, f"differs from {files[0]} in {', '.join(differs)}; cannot ensemble them")
    payload = {
        "format": ENSEMBLE_FORMAT,
        "model": {f"members.{i}.{k}": v for i, p in enumerate(payloads) for k, v in p["model"].items()},
        "optimizer": None,
        "epoch": max(int(p["epoch"]) for p in payloads),
        "config": first["config"],
        "modalities": list(first["modalities"]),
        "normalization": first["normalization"],
        "metrics": _plain(dict(metrics or {})),
        "postprocessing": postprocessing.to_dict() if postprocessing is not None else None,
        "ensemble": {
            "members": len(payloads),
            "sources": [str(f) for f in files],
            "epochs": [int(p["epoch"]) for p in payloads],
        },
    }
    path = Path(directory) / CHECKPOINT_FILE
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _postprocessing(file: Path, raw: Any) -> Postprocessing:
    """The stored postprocessing (none stored = threshold 0.5, no removal); bad values name the file."""
    try:
        return Postprocessing.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputFileError(file, f"bad postprocessing entry {raw!r} ({exc})") from exc
