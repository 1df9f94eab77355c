"""Helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import random
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


# Ports the kernel hands out for bind(0) and outgoing connections (Linux's default range),
# and Ray's worker ports: a test port chosen inside either can be taken, between choosing it
# and binding it, by a Ray process that starts in between (seen in CI: Serve's proxy could not
# bind a port that bind(0) had given out a moment before). Test ports come from the gap.
_RAY_WORKER_PORTS = range(10002, 20000)
_handed_out: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that no process is given by chance.

    Chosen outside the kernel's ephemeral range and Ray's worker ports, never the same twice in
    one test session (tests never use fixed ports).
    """
    ephemeral = _ephemeral_ports()
    candidates = [port for port in range(20000, 32768)
                  if port not in ephemeral and port not in _RAY_WORKER_PORTS and port not in _handed_out]
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port on 127.0.0.1 between 20000 and 32767")


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
