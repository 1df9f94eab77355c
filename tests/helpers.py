"""Helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import torch

from stroke_ray.checkpoint import save_checkpoint
from stroke_ray.config import DataConfig, ModelConfig, TrainConfig
from stroke_ray.models import build_model

__all__ = ["MODALITIES", "SES", "case_files", "free_port", "make_checkpoint", "mask_file", "stop_process"]

# The real ISLES'22 sample case's channels and session (../shared/data/isles22-sample).
MODALITIES = ["dwi", "adc", "flair"]
SES = "ses-0001"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (tests never use fixed ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(directory: Path, level: str = "32", patch: int = 32, bias: float | None = None) -> Path:
    """A freshly built tiny U-Net saved as a checkpoint; `bias` pins the output logit."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(widths=[4, 8, 16]), data=DataConfig(level=level, patch_size=patch),
                      val_overlap=0.0)
    model = build_model(cfg.model, in_channels=len(MODALITIES))
    if bias is not None:
        # Zero the output head's weights so every voxel gets the same logit: a known mask.
        last = model.head  # the output head (deep-supervision heads come after it in modules())
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(bias)
    return save_checkpoint(directory, model=model, epoch=0, config=cfg, modalities=MODALITIES, normalization="zscore")


def case_files(root: Path, subject: str = "sub-strokecase0009") -> dict[str, Path]:
    """{modality: file} of one case of an ISLES'22 repository-example (rawdata/) folder."""
    folder = root / "rawdata" / subject / SES
    return {m: folder / f"{subject}_{SES}_{m}.nii.gz" for m in MODALITIES}


def mask_file(root: Path, subject: str = "sub-strokecase0009") -> Path:
    """The ground-truth mask of one case of an ISLES'22 rawdata/ folder."""
    return root / "derivatives" / subject / SES / f"{subject}_{SES}_msk.nii.gz"


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate a server the test started; kill it if it has not exited within `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
