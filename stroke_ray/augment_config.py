"""Typed, validated settings of training-time augmentation (`TrainConfig.augment`).

An `AugmentConfig` is a preset (`none`, `light`, `strong`) refined per transform; every
transform field is None by default, meaning "as the preset says". `AugmentConfig.resolved()`
fills in the preset (`AUGMENT_PRESETS`); stroke_ray.augment only ever sees resolved configs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    model_validator,
)

__all__ = [
    "AUGMENT_PRESETS",
    "AugmentConfig",
    "AugmentPreset",
    "BiasFieldConfig",
    "BlurConfig",
    "ElasticConfig",
    "FactorConfig",
    "FlipConfig",
    "GammaConfig",
    "LowResConfig",
    "NoiseConfig",
    "NonNegativeRange",
    "PositiveRange",
    "Probability",
    "RotationConfig",
    "ScaleConfig",
    "ThickSliceConfig",
]


class _Strict(BaseModel):
    # Every config section's base (config.py uses it too): unknown keys are errors.
    model_config = ConfigDict(extra="forbid", frozen=False)


# Every transform field is None by default, meaning "as the preset says": a config keeps
# only what the user set, so a search over `augment.preset` combines with fixed per-transform
# settings, and a dumped config reloads to the same thing. `AugmentConfig.resolved()` fills
# in the preset; stroke_ray.augment only ever sees resolved configs.

AugmentPreset = Literal["none", "light", "strong"]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _ordered(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and v[0] > v[1]:
        raise ValueError(f"[low, high] needs low <= high, got {list(v)}")
    return v


PositiveRange = Annotated[tuple[PositiveFloat, PositiveFloat], AfterValidator(_ordered)]
NonNegativeRange = Annotated[tuple[NonNegativeFloat, NonNegativeFloat], AfterValidator(_ordered)]


class _Transform(_Strict):
    # Probability that a sample gets the transform (flip: per axis).
    p: Probability | None = None


class FlipConfig(_Transform):
    pass


class RotationConfig(_Transform):
    degrees: float | None = Field(None, ge=0.0, le=180.0)  # angle about each axis: U(-d, d)


class ScaleConfig(_Transform):
    range: PositiveRange | None = None  # object size factor, one for all axes (>1 = zoom in)


class ElasticConfig(_Transform):
    magnitude: NonNegativeRange | None = None  # largest displacement, fraction of the patch edge
    sigma: PositiveRange | None = None  # smoothness of the field, fraction of the patch edge


class GammaConfig(_Transform):
    range: PositiveRange | None = None  # exponent on the [min, max]-rescaled channel
    p_inverted: Probability | None = None  # separately: gamma of the inverted channel


class _PerChannel(_Transform):
    # Once a sample is picked (p), each of its channels is changed with this probability.
    p_per_channel: Probability | None = None


class FactorConfig(_PerChannel):
    range: PositiveRange | None = None  # multiplier, drawn per channel


class NoiseConfig(_Transform):
    std: NonNegativeRange | None = None  # Gaussian noise std (normalised units), per sample


class BlurConfig(_PerChannel):
    sigma: PositiveRange | None = None  # Gaussian sigma in voxels, per channel and axis


class LowResConfig(_PerChannel):
    zoom: PositiveRange | None = None  # down-sampling factor (< 1), then back up


class ThickSliceConfig(_Transform):
    # Slab averaging along one random voxel axis per sample, all channels alike: the
    # slice thickness of another scanner (2 mm -> 2 / zoom mm), then back to the grid.
    zoom: PositiveRange | None = None  # kept fraction of the samples along that axis (< 1)


class BiasFieldConfig(_PerChannel):
    strength: float | None = Field(None, ge=0.0, le=2.0)  # |coefficients| of a cubic log-field


class AugmentConfig(_Strict):
    """Training-time augmentation: a preset, refined per transform (None = the preset's value)."""

    preset: AugmentPreset = "none"
    flip: FlipConfig = Field(default_factory=FlipConfig)
    rotation: RotationConfig = Field(default_factory=RotationConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    elastic: ElasticConfig = Field(default_factory=ElasticConfig)
    bias_field: BiasFieldConfig = Field(default_factory=BiasFieldConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    blur: BlurConfig = Field(default_factory=BlurConfig)
    brightness: FactorConfig = Field(default_factory=FactorConfig)
    contrast: FactorConfig = Field(default_factory=FactorConfig)
    low_res: LowResConfig = Field(default_factory=LowResConfig)
    thick_slices: ThickSliceConfig = Field(default_factory=ThickSliceConfig)
    gamma: GammaConfig = Field(default_factory=GammaConfig)

    @model_validator(mode="before")
    @classmethod
    def _preset_by_name(cls, v: object) -> object:
        # `augment: strong` is short for `augment: {preset: strong}`.
        return {"preset": v} if isinstance(v, str) else v

    def resolved(self) -> "AugmentConfig":
        """This config with every unset field taken from its preset."""
        tree = self.model_dump()
        for transform, defaults in AUGMENT_PRESETS[self.preset].items():
            for key, value in defaults.items():
                if tree[transform][key] is None:
                    tree[transform][key] = value
        return AugmentConfig.model_validate(tree)


# Ranges follow nnU-Net's default training pipeline (nnUNetTrainer.get_training_transforms);
# `strong` is that pipeline plus a bias field, `light` keeps only mild geometric and
# brightness changes, `none` switches everything off but keeps the ranges, so that
# `{preset: none, flip: {p: 0.5}}` is flips alone.
_RANGES: dict[str, dict[str, Any]] = {
    "flip": {},
    "rotation": {"degrees": 30.0},
    "scale": {"range": (0.7, 1.4)},
    "elastic": {"magnitude": (0.0, 0.1), "sigma": (0.1, 0.2)},
    "bias_field": {"strength": 0.3, "p_per_channel": 1.0},
    "noise": {"std": (0.0, 0.1**0.5)},
    "blur": {"sigma": (0.5, 1.0), "p_per_channel": 0.5},
    "brightness": {"range": (0.75, 1.25), "p_per_channel": 1.0},
    "contrast": {"range": (0.75, 1.25), "p_per_channel": 1.0},
    "low_res": {"zoom": (0.5, 1.0), "p_per_channel": 0.5},
    "thick_slices": {"zoom": (0.33, 0.8)},
    "gamma": {"range": (0.7, 1.5)},
}
_STRONG_P = {
    "flip": 0.5, "rotation": 0.2, "scale": 0.2, "elastic": 0.0, "bias_field": 0.1, "noise": 0.1,
    "blur": 0.2, "brightness": 0.15, "contrast": 0.15, "low_res": 0.25, "thick_slices": 0.25, "gamma": 0.3,
}
_LIGHT = {
    "flip": {"p": 0.5},
    "rotation": {"p": 0.2, "degrees": 15.0},
    "scale": {"p": 0.2, "range": (0.85, 1.25)},
    "brightness": {"p": 0.15},
    "gamma": {"p": 0.15, "p_inverted": 0.0},
    "noise": {"p": 0.1, "std": (0.0, 0.1)},
}


def _preset(probabilities: dict[str, float], overrides: dict[str, dict] | None = None) -> dict:
    out = {name: {**ranges, "p": probabilities.get(name, 0.0)} for name, ranges in _RANGES.items()}
    out["gamma"]["p_inverted"] = 0.1 if probabilities.get("gamma") else 0.0
    for name, values in (overrides or {}).items():
        out[name].update(values)
    return out


AUGMENT_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "none": _preset({}),
    "light": _preset({}, _LIGHT),
    "strong": _preset(_STRONG_P),
}
