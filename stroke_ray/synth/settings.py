"""What a synthetic dataset is drawn from: typed, validated settings and named profiles.

`train` is the distribution training cases come from. `shifted` is a held-out distribution
that training never sees (see docs/synthetic.md): its own random stream (no case is shared
with any `train` seed), 1.5 T-like coarse noisy DWI with thick slices and 3 T thin-in-plane
DWI, flipped and permuted axis orders and steeper oblique planes, other tissue contrasts,
weaker lesions, more noise and bias, clusters of 2-5 mm radius embolic lesions and the
real-scan DWI artefacts at full probability.
"""

from __future__ import annotations

from typing import Annotated

import nibabel as nib
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from stroke_ray.errors import StrokeRayError

__all__ = ["PROFILES", "Artefacts", "Scanner", "SynthSettings", "pick", "settings_for", "uniform",
           "without_artefacts"]



def _ordered(value: tuple) -> tuple:
    if value[0] > value[1]:
        raise ValueError(f"range {value}: the low end is above the high end")
    return value


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]  # (low, high), drawn uniformly
Positive = Annotated[float, Field(gt=0.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Scanner(_Frozen):
    """One kind of acquisition: DWI/ADC grid, FLAIR grid, field strength and SNR."""

    field_strength_t: Positive = 3.0
    dwi_inplane_mm: Range = (1.9, 2.1)
    dwi_slice_mm: tuple[Positive, ...] = (2.0, 2.0, 2.2)  # one drawn per case
    dwi_matrix: tuple[int, ...] = (104, 112, 112, 120)  # in-plane voxels, one drawn per case
    coverage_mm: Positive = 146.0  # head-foot extent of the DWI slab
    flair_inplane_mm: Range = (0.86, 0.94)
    flair_slice_mm: Positive = 5.0
    noise_scale: Range = (1.0, 1.0)  # times each modality's own noise sigma


class Artefacts(_Frozen):
    """Real-scan DWI artefacts with a normal ADC (susceptibility, partial volume, T2 shine).

    Regional: the cerebellar cortex, the temporal poles and the frontal base (orbitofrontal
    cortex over the sinuses) lit up as a whole; rim: patches of the cortical ribbon along
    the brain edge. DWI is multiplied by 1 + gain x weight there; ADC is left alone or
    raised a little (never lowered), and the lesion mask is never touched.
    """

    probability: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8
    regional_gain: Range = (0.3, 0.9)
    rim_gain: Range = (0.4, 1.1)
    rim_depth_mm: Positive = 6.0
    adc_gain: Range = (0.0, 0.1)
    # Hot spots: small, very bright blobs inside the sites and the rim (susceptibility
    # pile-up is spotty): the tail of the real DWI (its 99.9th percentile outside lesions
    # is 2.9 x the median, its maximum 6 x), lesion-sized and lesion-bright, normal ADC.
    spot_count: Annotated[tuple[int, int], AfterValidator(_ordered)] = (3, 10)  # inclusive
    spot_gain: Range = (1.5, 4.0)
    spot_radius_mm: Range = (2.5, 6.0)


class SynthSettings(_Frozen):
    """Everything a case is drawn from, besides the seed and its index.

    Raises (at construction): pydantic.ValidationError for an unknown field, a reversed
    range, an unknown lesion class or an invalid orientation code.
    """

    profile: str = "train"
    stream: Annotated[int, Field(ge=0)] = 0  # 0: the original stream; else salted per profile
    scanners: tuple[Scanner, ...] = (Scanner(),)
    # Orientation of the stored DWI/FLAIR voxel axes (nibabel axis codes): one drawn per case.
    orientations: tuple[str, ...] = ("LAS",)
    tilt_deg: tuple[float, float, float] = (12.0, 3.0, 3.0)  # max oblique angle about x, y, z
    tissue_jitter: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.08
    bias_sd: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.08
    # Lesion intensity factor ranges by modality; a modality not named keeps its
    # contrast.CONTRASTS range.
    lesion_factor: dict[str, Range] = {}
    lesion_classes: tuple[str, ...] = ("territorial", "embolic", "medium", "lacunar")
    embolic_radius_mm: Range = (1.5, 3.0)
    embolic_count: Annotated[tuple[int, int], AfterValidator(_ordered)] = (2, 6)  # inclusive
    # None: embolic dots anywhere in the brain; a distance: all within it of one point
    # (a shower of emboli in one arterial territory).
    embolic_cluster_mm: Positive | None = None
    artefacts: Artefacts = Artefacts()

    @field_validator("orientations")
    @classmethod
    def _axis_codes(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        if not codes:
            raise ValueError("at least one orientation is needed")
        for code in codes:
            try:
                ornt = nib.orientations.axcodes2ornt(tuple(code))
            except Exception as exc:
                raise ValueError(f"orientation {code!r} is not a nibabel axis code") from exc
            if len(code) != 3 or len({int(a) for a in ornt[:, 0]}) != 3 \
                    or ("S" not in code and "I" not in code):
                raise ValueError(f"orientation {code!r} needs one L/R, one A/P and one S/I axis")
        return codes

    @field_validator("lesion_classes")
    @classmethod
    def _classes(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        known = ("territorial", "embolic", "medium", "lacunar")
        if not classes or any(c not in known for c in classes):
            raise ValueError(f"lesion classes must be among {', '.join(known)}, got {classes}")
        return classes

    @field_validator("scanners")
    @classmethod
    def _scanners(cls, scanners: tuple[Scanner, ...]) -> tuple[Scanner, ...]:
        if not scanners:
            raise ValueError("at least one scanner is needed")
        return scanners


PROFILES: dict[str, SynthSettings] = {
    "train": SynthSettings(),
    "shifted": SynthSettings(
        profile="shifted",
        stream=1729,
        scanners=(
            # 1.5 T: coarse in-plane, thick slices, lower SNR.
            Scanner(field_strength_t=1.5, dwi_inplane_mm=(2.5, 2.9), dwi_slice_mm=(4.0, 5.0, 6.0),
                    dwi_matrix=(88, 96), coverage_mm=150.0, flair_inplane_mm=(0.95, 1.05),
                    flair_slice_mm=6.0, noise_scale=(1.6, 2.4)),
            # 3 T of another make: fine in-plane, 3-4 mm slices.
            Scanner(field_strength_t=3.0, dwi_inplane_mm=(1.4, 1.6), dwi_slice_mm=(3.0, 3.5, 4.0),
                    dwi_matrix=(160, 168), coverage_mm=148.0, flair_inplane_mm=(0.8, 0.9),
                    flair_slice_mm=5.5, noise_scale=(1.3, 1.8)),
        ),
        orientations=("RAS", "LPS", "LPI", "RPS", "ALS", "PRS"),
        tilt_deg=(25.0, 8.0, 8.0),
        tissue_jitter=0.15,
        bias_sd=0.12,
        lesion_factor={"dwi": (1.3, 2.0), "adc": (0.5, 0.8), "flair": (1.05, 1.25)},
        lesion_classes=("territorial", "embolic", "medium", "embolic", "lacunar"),
        embolic_radius_mm=(2.0, 5.0),
        embolic_count=(3, 8),
        embolic_cluster_mm=30.0,
        artefacts=Artefacts(probability=1.0, regional_gain=(0.4, 1.0), rim_gain=(0.5, 1.2),
                            spot_count=(4, 12), spot_gain=(1.5, 4.5)),
    ),
}


def settings_for(profile: str | SynthSettings | None) -> SynthSettings:
    """The settings of a profile name (or the settings themselves).

    Raises:
        StrokeRayError: for an unknown profile name.
    """
    if profile is None:
        return PROFILES["train"]
    if isinstance(profile, SynthSettings):
        return profile
    if profile not in PROFILES:
        raise StrokeRayError(f"unknown synthetic profile {profile!r}; expected one of {', '.join(PROFILES)}")
    return PROFILES[profile]


def without_artefacts(settings: SynthSettings) -> SynthSettings:
    """The same settings with the real-scan artefacts switched off (everything else the
    same case by case: artefacts have their own random stream)."""
    return settings.model_copy(update={"artefacts": settings.artefacts.model_copy(update={"probability": 0.0})})


def pick(rng, options: tuple):
    """One of `options`, uniformly; a single option draws nothing from `rng`, so adding a
    setting with one value leaves every other draw of a case as it was."""
    return options[0] if len(options) == 1 else options[int(rng.integers(len(options)))]


def uniform(rng, bounds: tuple[float, float]) -> float:
    """A uniform draw in `bounds`; an empty range draws nothing from `rng` (as `pick`)."""
    low, high = bounds
    return float(low) if low == high else float(rng.uniform(low, high))
