"""Typed, validated configuration for training, tuning and prediction.

One `TrainConfig` describes a training run completely; it is what a YAML file or CLI flags
are parsed into, what a Tune trial builds from its sampled parameters, and what a
checkpoint carries (as a plain dict) so that prediction rebuilds the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stroke_ray.errors import ConfigError

Architecture = Literal["unet3d", "unet2plus1d"]
LossName = Literal["dice_bce", "gdl_ce", "gdl_ce_log", "dice_ce", "dice", "bce", "gdl", "ce"]
SamplerName = Literal["uniform", "threshold", "threshold_cube", "foreground"]


def read_yaml(path: Path, kind: str):
    """The parsed YAML in `path`; a missing file or a syntax error raises ConfigError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such {kind}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelConfig(_Strict):
    architecture: Architecture = "unet3d"
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    upsample: Literal["trilinear", "transpose"] = "trilinear"
    # (2+1)D only: None = parameter-matched intermediate width (Tran et al. 2018).
    mid_channels: int | None = None
    checkpointing: bool = False
    out_channels: int = 1  # 1 = sigmoid head; >1 = softmax head

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if len(v) < 2 or any(w < 1 for w in v):
            raise ValueError("widths needs at least two positive entries")
        return v


class DataConfig(_Strict):
    store: str = "data/demo.zarr"
    level: str = "64"  # "native" or a cube edge written at ingest ("64", "128")
    patch_size: int = 64
    sampler: SamplerName = "threshold"
    threshold: float = Field(0.2, ge=0.0, le=1.0)
    foreground_fraction: float = Field(0.33, ge=0.0, le=1.0)
    samples_per_volume: int = Field(8, ge=1)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    num_workers: int = Field(0, ge=0)

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, v: object) -> str:
        return str(v)


class OptimConfig(_Strict):
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    schedule: Literal["constant", "cosine", "poly"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)


class TrainConfig(_Strict):
    name: str = "stroke-ray"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossName = "dice_bce"
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    batch_size: int = Field(2, ge=1)
    num_workers: int = Field(1, ge=1)  # Ray Train workers
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    amp: bool = True  # mixed precision, GPU only
    seed: int = 0
    val_overlap: float = Field(0.5, ge=0.0, lt=1.0)
    val_max_subjects: int | None = None
    storage_path: str = "runs"
    cpus_per_worker: int = Field(1, ge=1)  # CPUs Ray reserves per training worker
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1 = unlimited
    checkpoints_to_keep: int = Field(2, ge=1)
    overlay_every: int = Field(0, ge=0)  # log overlay images every k epochs; 0 = last epoch only
    tracking_uri: str | None = None  # None = sqlite:///<cwd>/mlflow.db
    experiment: str = "stroke-ray"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Load and validate a YAML config file; errors name the file and the field."""
        path = Path(path)
        return cls.from_dict(read_yaml(path, "config file") or {}, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "TrainConfig":
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"{source}: {problems}") from exc
