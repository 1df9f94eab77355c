"""Typed, validated configuration for training, tuning and prediction.

One `TrainConfig` describes a training run completely; it is what a YAML file or CLI flags
are parsed into, what a Tune trial builds from its sampled parameters, and what a
checkpoint carries (as a plain dict) so that prediction rebuilds the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# One base for every config section (unknown keys are errors), written in augment_config.
from stroke_ray.augment_config import AugmentConfig, _Strict
from stroke_ray.errors import ConfigError
from stroke_ray.grid import parse_level
from stroke_ray.resources import config_file

__all__ = [
    "Architecture",
    "DataConfig",
    "LossName",
    "ModelConfig",
    "OptimConfig",
    "SamplerName",
    "TrainConfig",
    "flatten",
    "read_yaml",
]

Architecture = Literal["unet3d", "unet2plus1d"]
LossName = Literal["dice_bce", "gdl_ce", "gdl_ce_log", "dice_ce", "dice", "bce", "gdl", "ce"]
SamplerName = Literal["uniform", "threshold", "threshold_cube", "foreground", "lesion"]


def read_yaml(path: Path, kind: str):
    """The parsed YAML in `path`; a missing file or a syntax error raises ConfigError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such {kind}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: dotted paths, values kept as they are.

    The names are the dotted TrainConfig paths that search spaces and MLflow params use.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def mirror_axes(axes) -> tuple[int, ...]:
    """Test-time mirroring axes as a sorted tuple of distinct spatial axes (0, 1, 2 = X, Y, Z).

    Raises:
        ValueError: an axis outside 0, 1, 2, or one given twice.
    """
    values = tuple(int(a) for a in axes)
    if any(a not in (0, 1, 2) for a in values) or len(set(values)) != len(values):
        raise ValueError(f"mirroring axes must be distinct values of 0, 1, 2; got {list(axes)}")
    return tuple(sorted(values))


class ModelConfig(_Strict):
    architecture: Architecture = "unet3d"
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    upsample: Literal["trilinear", "transpose"] = "trilinear"
    # BatchNorm (the seed study's) or affine InstanceNorm (nnU-Net's, the recipe's: robust
    # to batches of 2 and to scanners whose statistics training never saw); models.py.
    norm: Literal["batch", "instance"] = "batch"
    # (2+1)D only: None = parameter-matched intermediate width (Tran et al. 2018).
    mid_channels: int | None = None
    checkpointing: bool = False
    out_channels: int = 1  # 1 = sigmoid head; >1 = softmax head
    # Extra 1x1x1 heads on the decoder's lower levels, trained with nnU-Net's halving loss
    # weights (losses.DeepSupervisionLoss); training only, never at inference. None = on for
    # unet3d, off for unet2plus1d (the seed study's network), decided once, below.
    deep_supervision: bool | None = None

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if len(v) < 2 or any(w < 1 for w in v):
            raise ValueError("widths needs at least two positive entries")
        return v

    @model_validator(mode="after")
    def _deep_supervision_default(self) -> "ModelConfig":
        if self.deep_supervision is None:
            self.deep_supervision = self.architecture == "unet3d"
        return self


class DataConfig(_Strict):
    store: str = "data/demo.zarr"
    # "native", a cube edge written at ingest ("64", "128") or a spacing ("2mm", "1mm")
    level: str = "64"
    # Patch edge in voxels of `level`: one int (a cube) or three (x, y, z), e.g. [96, 96, 64].
    patch_size: int | tuple[int, int, int] = 64
    sampler: SamplerName = "threshold"
    threshold: float = Field(0.2, ge=0.0, le=1.0)
    foreground_fraction: float = Field(0.33, ge=0.0, le=1.0)
    # Share of patches centred on a lesion look-alike (a bright non-lesion spot recorded at
    # convert time, lookalikes.py): hard negatives. Foreground and lesion samplers only.
    lookalike_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    samples_per_volume: int = Field(8, ge=1)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    # k-fold cross-validation: validate on fold `fold` of `num_folds` (folds.fold_splits)
    # instead of the val_fraction split; None = the val_fraction split.
    fold: int | None = Field(None, ge=0)
    num_folds: int = Field(5, ge=2)
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per training worker
    # RAM for whole subject levels per data-loading process (the training worker itself, or
    # each of its loader_workers): the hottest subjects stay in RAM, the rest are read
    # straight from their chunks (docs/sampling.md). 0 = always read directly.
    cache_gib: float = Field(1.0, ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: object) -> object:
        # `data.num_workers` was easy to mistake for the Ray Train workers (`num_workers`).
        # A user's file gets this error; a checkpoint's config is migrated (`from_stored`).
        if isinstance(raw, dict) and "num_workers" in raw:
            raise PydanticCustomError(
                "renamed", "num_workers was renamed loader_workers (DataLoader processes per training worker)"
            )
        return raw

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, v: object) -> str:
        parse_level(str(v))  # ValueError -> a validation error naming data.level
        return str(v).strip()

    @field_validator("patch_size")
    @classmethod
    def _patch_size(cls, v: int | tuple[int, int, int]) -> int | tuple[int, int, int]:
        edges = (v,) * 3 if isinstance(v, int) else tuple(v)
        if any(e < 1 for e in edges):
            raise ValueError("patch edges must be positive")
        return v

    @property
    def patch(self) -> tuple[int, int, int]:
        """The patch size as three edges."""
        return (self.patch_size,) * 3 if isinstance(self.patch_size, int) else tuple(self.patch_size)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _lookalikes(self) -> "DataConfig":
        if self.lookalike_fraction > 0:
            if self.sampler not in ("foreground", "lesion"):
                raise ValueError(f"lookalike_fraction needs the foreground or lesion sampler, not {self.sampler!r}")
            if self.foreground_fraction + self.lookalike_fraction > 1.0:
                raise ValueError(f"foreground_fraction + lookalike_fraction = "
                                 f"{self.foreground_fraction + self.lookalike_fraction:g} exceeds 1")
        return self

    @model_validator(mode="after")
    def _fold(self) -> "DataConfig":
        if self.fold is not None and self.fold >= self.num_folds:
            raise ValueError(f"fold {self.fold} is not one of the {self.num_folds} folds (0..{self.num_folds - 1})")
        return self


class OptimConfig(_Strict):
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    schedule: Literal["constant", "cosine", "poly"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)


# Keys renamed since checkpoints began to carry their config: (section, old name) -> new
# name. `TrainConfig.from_stored` reads old checkpoints through this table.
_RENAMED_KEYS = {("data", "num_workers"): "loader_workers"}


class TrainConfig(_Strict):
    name: str = "stroke-ray"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossName = "dice_bce"
    # Cross-entropy weight of a lesion voxel, up to this many times a background voxel's, by
    # how small its lesion is (losses.small_lesion_weights); 1 = plain cross-entropy.
    small_lesion_weight: float = Field(1.0, ge=1.0)
    epochs: int = Field(10, ge=1)  # an upper bound when time_budget_s is set
    # Stop at the first epoch boundary after this many seconds of training (wall clock, or
    # the training process's CPU seconds with time_budget_clock "process"); None = no limit.
    time_budget_s: float | None = Field(None, gt=0)
    time_budget_clock: Literal["wall", "process"] = "wall"
    steps_per_epoch: int = Field(50, ge=1)
    batch_size: int = Field(2, ge=1)
    num_workers: int = Field(1, ge=1)  # Ray Train workers
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    amp: bool = True  # mixed precision, GPU only
    seed: int = 0
    val_overlap: float = Field(0.5, ge=0.0, lt=1.0)
    val_max_subjects: int | None = None
    # Mirroring axes (0, 1, 2) of test-time augmentation in validation; [] = none. The
    # postprocessing is chosen on validation, so match what predict will use to choose it
    # under the same inference (8x the validation time with all three axes).
    val_tta_axes: list[int] = Field(default_factory=list)
    storage_path: str = "runs"
    # What Ray reserves per training worker. Fractions share a CPU or a GPU between workers of
    # different trials (`gpus_per_trial: 0.25` in a search space puts four trials on a GPU);
    # gpus_per_worker counts only with use_gpu.
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1 = unlimited
    checkpoints_to_keep: int = Field(2, ge=1)
    overlay_every: int = Field(0, ge=0)  # log overlay images every k epochs; 0 = last epoch only
    tracking_uri: str | None = None  # None = sqlite:///<cwd>/mlflow.db
    experiment: str = "stroke-ray"

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        # Ray's rule for a task's GPUs: a fraction of one GPU, or whole GPUs.
        if v > 1 and v != int(v):
            raise ValueError(f"must be at most 1 (a share of one GPU) or a whole number, not {v}")
        return v

    @field_validator("val_tta_axes")
    @classmethod
    def _tta_axes(cls, v: list[int]) -> list[int]:
        return list(mirror_axes(v))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Load and validate a YAML config file (or a shipped one by name, `train_example`).

        Raises:
            ConfigError: a missing file or an invalid config, naming the file and the field.
        """
        path = config_file(path)
        return cls.from_dict(read_yaml(path, "config file") or {}, source=str(path))

    @classmethod
    def from_stored(cls, raw: Mapping[str, Any], source: str = "stored config") -> "TrainConfig":
        """Validate a config stored by an earlier stroke-ray (a checkpoint's), old key names migrated.

        A stored config records what was trained and cannot be edited, so keys renamed since
        (`_RENAMED_KEYS`) are read under their new names; a config file a user writes gets
        the error naming the new key instead (`DataConfig`). A stored config holding both
        names keeps the new one's value.

        Raises:
            ConfigError: what migration does not fix, naming `source` and the field.
        """
        tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
        for (section, old), new in _RENAMED_KEYS.items():
            part = tree.get(section)
            if isinstance(part, dict) and old in part:
                value = part.pop(old)
                part.setdefault(new, value)
        return cls.from_dict(tree, source=source)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "TrainConfig":
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"{source}: {problems}") from exc
