"""One synthetic case in memory: its grids, anatomy, lesions and images, drawn from its own
random stream."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from stroke_ray.errors import StrokeRayError
from stroke_ray.synth.anatomy import (
    Grid,
    Sampled,
    SubjectTransform,
    mni_anatomy,
    rotation,
    sample_anatomy,
)
from stroke_ray.synth.artefacts import ARTEFACT_STREAM, artefact_gains, draw_artefacts
from stroke_ray.synth.contrast import CONTRASTS, FLAIR_MISMATCH_P, render
from stroke_ray.synth.lesions import lesion_map
from stroke_ray.synth.settings import Scanner, SynthSettings, pick, settings_for, uniform

__all__ = ["BRAIN_SCALE", "LAYOUTS", "SynthCase", "check_layout", "isles_grids", "subject_id", "synth_case"]

LAYOUTS = ("isles22", "atlas")
BRAIN_SCALE = 0.92


@dataclass
class SynthCase:
    """One generated case in memory: images on their own grids, mask on the reference grid."""

    subject: str
    layout: str
    images: dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (array float32, affine)
    mask: np.ndarray
    mask_affine: np.ndarray
    lesion_class: str
    info: dict  # JSON-able description of what was drawn


def subject_id(index: int, layout: str = "isles22") -> str:
    """Folder name of case `index` (0-based): sub-synth0001, in every layout.

    Never a real dataset's id (ISLES'22 sub-strokecaseNNNN, ATLAS sub-rNNNsNNN), so a
    synthetic case can neither be mistaken for a patient's nor land on one's files.
    """
    return f"sub-synth{index + 1:04d}"


def synth_case(index: int, layout: str = "isles22", seed: int = 0,
               settings: str | SynthSettings | None = None) -> SynthCase:
    """Draw case `index` of the dataset with `seed` (independent of how many are drawn).

    Args:
        settings: a profile name (`train`, the default, or `shifted`) or SynthSettings.

    Raises:
        StrokeRayError: for an unknown layout or profile, or a negative seed or index.
    """
    check_layout(layout)
    settings = settings_for(settings)
    if int(seed) < 0 or int(index) < 0:
        raise StrokeRayError(f"seed and case index must be non-negative, got seed={seed}, index={index}")
    stream = [int(seed), int(index), LAYOUTS.index(layout)]
    if settings.stream:  # another profile: a stream that no `train` seed reaches
        stream.append(settings.stream)
    rng = np.random.default_rng(stream)
    anatomy = mni_anatomy()
    centre = anatomy.centre
    lesion_class = settings.lesion_classes[index % len(settings.lesion_classes)]
    scanner, orientation, noise_scale, draw = Scanner(), "LAS", 1.0, None

    if layout == "atlas":
        # ATLAS images are registered to MNI: only residual misregistration remains.
        transform = SubjectTransform.random(rng, 1.5, 0.03, 1.0, 1.0, centre)
        grids = {"t1w": Grid(anatomy.template.shape, anatomy.template.affine.copy())}
        reference = "t1w"
    else:
        # The template brain (1.9 l inside its mask) is larger than a typical stroke
        # patient's (the real ISLES'22 sample: 1.45 l): shrink by 8 % on average.
        transform = SubjectTransform.random(rng, 4.0, 0.08, 4.0, 2.0, centre, mean_scale=BRAIN_SCALE)
        scanner, orientation = pick(rng, settings.scanners), pick(rng, settings.orientations)
        grids = isles_grids(rng, transform.matrix[:3, :3] @ centre + transform.matrix[:3, 3], scanner,
                            orientation, settings.tilt_deg)
        reference = "dwi"
        noise_scale = uniform(rng, scanner.noise_scale)
        # Their own stream: the same case with and without artefacts differs only by them.
        draw = draw_artefacts(np.random.default_rng([*stream, ARTEFACT_STREAM]), settings.artefacts)

    lesion, lesion_box, lesions = lesion_map(anatomy, rng, lesion_class, settings)
    factors = {m: float(rng.uniform(*settings.lesion_factor.get(m, CONTRASTS[m].lesion))) for m in grids}
    mismatch = layout == "isles22" and rng.random() < FLAIR_MISMATCH_P
    if mismatch:
        factors["flair"] = float(rng.uniform(1.0, 1.04))

    images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sampled: dict[bytes, Sampled] = {}
    gains: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    for modality, grid in grids.items():
        key = grid.affine.tobytes() + np.asarray(grid.shape).tobytes()
        if key not in sampled:  # DWI and ADC share a grid: sample the anatomy once
            sampled[key] = sample_anatomy(anatomy, transform, grid, lesion, lesion_box)
        artefact = None
        if draw is not None and modality in ("dwi", "adc"):
            if key not in gains:
                gains[key] = artefact_gains(anatomy, sampled[key], draw)
            artefact = gains[key][0 if modality == "dwi" else 1]
        values = render(modality, sampled[key], factors[modality], rng, tissue_jitter=settings.tissue_jitter,
                        bias_sd=settings.bias_sd, noise_scale=noise_scale, artefact=artefact)
        images[modality] = (sampled[key].volume(values), grid.affine)
    ref = sampled[grids[reference].affine.tobytes() + np.asarray(grids[reference].shape).tobytes()]
    dtype = np.uint16 if layout == "isles22" else np.uint8  # as the real releases store them
    mask = ref.volume(ref.lesion >= 0.5, dtype)
    if not mask.any():  # a dot may cover under half of every voxel: keep its peak voxel
        mask.flat[ref.flat[int(np.argmax(ref.lesion))]] = 1

    voxel_ml = float(np.abs(np.linalg.det(grids[reference].affine[:3, :3]))) / 1000.0
    info = {
        "profile": settings.profile,
        "lesion_class": lesion_class,
        "lesions": lesions,
        "lesion_ml": round(float(mask.sum()) * voxel_ml, 3),
        "lesion_factor": {m: round(f, 3) for m, f in factors.items()},
        "flair_mismatch": bool(mismatch),
        "field_strength_t": scanner.field_strength_t,
        "orientation": orientation,
        "noise_scale": round(noise_scale, 3),
        "artefacts": draw.describe() if draw is not None else None,
    }
    if layout == "atlas":  # the ATLAS grid is fixed: no scanner, orientation or artefacts
        for key in ("field_strength_t", "orientation", "noise_scale", "artefacts"):
            info.pop(key)
    return SynthCase(subject_id(index, layout), layout, images, mask, grids[reference].affine,
                     lesion_class, info)


def check_layout(layout: str) -> None:
    """Raises: StrokeRayError if `layout` is not one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise StrokeRayError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _grid_around(centre: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 angles_deg: np.ndarray, orientation: str = "LAS") -> Grid:
    """A grid centred on `centre` whose voxel axes point as `orientation` says (nibabel
    axis codes: LAS is the ISLES'22 files' first axis right-to-left), then tilted.

    `shape` and `spacing` are given in acquisition order (in-plane, in-plane, slice) and
    go to the voxel axes of the L/R, A/P and S/I letters respectively.
    """
    ornt = nib.orientations.axcodes2ornt(tuple(orientation))  # per voxel axis: world axis, sign
    world = ornt[:, 0].astype(int)
    direction = np.zeros((3, 3))
    direction[world, np.arange(3)] = ornt[:, 1]
    direction = rotation(np.deg2rad(angles_deg)) @ direction
    shape = tuple(int(shape[w]) for w in world)
    spacing = np.asarray(spacing, dtype=np.float64)[world]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return Grid(shape, np.round(affine, 6))


def isles_grids(rng: np.random.Generator, brain_centre: np.ndarray, scanner: Scanner | None = None,
                orientation: str = "LAS", tilt_deg: tuple[float, float, float] = (12.0, 3.0, 3.0)
                ) -> dict[str, Grid]:
    """DWI/ADC on one grid; FLAIR on its own thin in-plane, thick-slice grid."""
    scanner = scanner or Scanner()
    # Slices are often tilted along the AC-PC line: a pitch of up to ~12 degrees.
    tilt = np.array([rng.uniform(-t, t) for t in tilt_deg])
    inplane = round(float(rng.uniform(*scanner.dwi_inplane_mm)), 3)
    slice_mm = float(rng.choice(scanner.dwi_slice_mm))
    matrix = int(rng.choice(scanner.dwi_matrix))
    n_slices = int(round(scanner.coverage_mm / slice_mm)) + int(rng.integers(-2, 3))
    dwi = _grid_around(brain_centre + rng.uniform(-5, 5, 3), (matrix, matrix, n_slices),
                       (inplane, inplane, slice_mm), tilt, orientation)
    # FLAIR: 256 x 256 at ~0.9 mm in-plane (the real scans are often 512 x 512 at 0.45 mm;
    # half the matrix keeps generation fast and still 2x finer than DWI), thick slices,
    # planned a little differently from the DWI.
    flair_inplane = round(float(rng.uniform(*scanner.flair_inplane_mm)), 3)
    flair_slices = int(round(scanner.coverage_mm / scanner.flair_slice_mm)) + int(rng.integers(-2, 3))
    flair = _grid_around(brain_centre + rng.uniform(-6, 6, 3), (256, 256, flair_slices),
                         (flair_inplane, flair_inplane, scanner.flair_slice_mm),
                         tilt + rng.uniform(-3.0, 3.0, 3), orientation)
    return {"dwi": dwi, "adc": dwi, "flair": flair}
