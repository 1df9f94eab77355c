"""Synthetic ISLES'22- and ATLAS-like stroke cases on real MNI152 anatomy.

Every case starts from the ICBM152 2009 template that nilearn ships inside its package
(T1, grey- and white-matter probability maps at 1 mm; no download): the three tissue
fractions (GM, WM, CSF) are carried through a random subject transform (small affine plus
a smooth elastic displacement) straight onto each acquisition grid, with a Gaussian
pre-filter matching the voxel footprint so that coarse voxels mix tissues (partial
volume) instead of aliasing. Intensities are a per-tissue mix with per-case jitter, lesions
scale them (DWI up, ADC down, FLAIR slightly up, T1w down), then a smooth multiplicative
bias field and Rician noise are applied and the background is zeroed, like the
skull-stripped ISLES'22 data.

Case k is drawn from ``numpy.random.default_rng([seed, k])`` alone, so it is the same
whatever the number of cases asked for, and the files are byte-identical across runs
(gzip with a fixed header time). See docs/synthetic.md for the numbers and the limits.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from stroke_ray.errors import InputFileError, StrokeRayError

LAYOUTS = ("isles22", "atlas")
ATLAS_SPACE = "space-MNI152NLin2009aSym"

# Size classes cycle with the case index, so any 4 consecutive cases hold a large
# territorial infarct, a scatter of embolic dots, a medium and a lacunar lesion: even a
# tiny dataset has both ends of the lesion-volume range.
LESION_CLASSES = ("territorial", "embolic", "medium", "lacunar")

# Rough centres (MNI mm, right hemisphere; mirrored for the left) and radii of arterial
# territories, to place territorial infarcts where real ones sit.
TERRITORIES = {
    "mca": ((42.0, -10.0, 15.0), (22.0, 40.0, 32.0)),
    "aca": ((10.0, 20.0, 42.0), (10.0, 35.0, 25.0)),
    "pca": ((22.0, -72.0, 4.0), (16.0, 22.0, 18.0)),
    "cerebellar": ((24.0, -62.0, -34.0), (16.0, 16.0, 14.0)),
}


@dataclass(frozen=True)
class Contrast:
    """Mean tissue intensities of one modality and how a lesion scales them."""

    gm: float
    wm: float
    csf: float
    lesion: tuple[float, float]  # multiplicative factor range inside the lesion
    noise: float  # noise sigma as a fraction of the WM intensity
    rician: bool = True  # magnitude images; ADC is a computed map (Gaussian noise)
    gain: float = 0.2  # per-case global gain range (+-), 0 for quantitative maps


# DWI (b=800-1000) and ADC (1e-3 mm^2/s, as the ISLES'22 files store it) are matched to
# the real sample's brain ranges: DWI median ~270, ADC median ~0.9, FLAIR median ~1100,
# lesion DWI x1.74 and ADC x0.69 of the brain median.
CONTRASTS = {
    "dwi": Contrast(gm=320.0, wm=255.0, csf=70.0, lesion=(1.5, 2.5), noise=0.03),
    "adc": Contrast(gm=0.85, wm=0.72, csf=3.0, lesion=(0.4, 0.7), noise=0.03, rician=False, gain=0.0),
    "flair": Contrast(gm=1250.0, wm=1000.0, csf=300.0, lesion=(1.1, 1.3), noise=0.03),
    "t1w": Contrast(gm=70.0, wm=110.0, csf=25.0, lesion=(0.35, 0.7), noise=0.02),
}
# Share of acute cases imaged early enough that FLAIR does not show the lesion yet
# (the DWI-FLAIR mismatch used to time strokes).
FLAIR_MISMATCH_P = 0.3
BRAIN_SCALE = 0.92


@dataclass(frozen=True)
class Grid:
    """An acquisition grid: shape and voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray


@dataclass(eq=False)
class Anatomy:
    """Tissue fractions of the MNI152 2009a template at 1 mm, cropped to the brain (loaded once)."""

    tissues: np.ndarray  # (3, X, Y, Z) float32: gm, wm, csf, cropped to the brain
    affine: np.ndarray  # of the cropped maps
    template: Grid  # the full 197 x 233 x 189 template grid (the ATLAS R2.0 grid)
    centre: np.ndarray  # centre of the brain's bounding box, template mm
    near_brain: np.ndarray  # bool, subsampled by 4: brain dilated by ~8 mm
    parenchyma: np.ndarray  # bool, GM + WM >= 0.5: where infarcts may be
    candidates: np.ndarray  # (n, 3) parenchyma voxels on a 2-voxel lattice: lesion centres
    _smoothed: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.tissues.shape[1:])

    def on_template(self) -> np.ndarray:
        """The tissue maps (3, 197, 233, 189) back on the full template grid."""
        lo = np.rint(np.linalg.solve(self.template.affine, self.affine[:, 3])[:3]).astype(int)
        out = np.zeros((3, *self.template.shape), np.float32)
        out[(slice(None), *(slice(a, a + n) for a, n in zip(lo, self.shape)))] = self.tissues
        return out

    def smoothed(self, sigma: tuple[float, float, float]) -> np.ndarray:
        """Tissue maps pre-filtered for a voxel footprint of `sigma` template voxels."""
        # Half-voxel steps: nearby grids share one filtered copy (each is ~50 MB).
        key = tuple(round(float(s) * 2.0) / 2.0 for s in sigma)
        if key not in self._smoothed:
            if max(key) <= 0.0:
                self._smoothed[key] = self.tissues
            else:
                self._smoothed[key] = np.stack(
                    [ndimage.gaussian_filter(t, key, mode="constant") for t in self.tissues]
                )
        return self._smoothed[key]


TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _template_images() -> dict[str, nib.Nifti1Image]:
    """The ICBM152 2009 files packaged inside nilearn, read without importing nilearn.

    Importing nilearn pulls in scikit-learn and pandas (seconds); the files are what
    nilearn.datasets.load_mni152_{,gm_,wm_}template(resolution=1) read, so go to them
    directly and fall back to those functions if a release moves them.
    """
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise StrokeRayError("nilearn is not installed; it provides the MNI152 template")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if all((data / name).is_file() for name in TEMPLATE_FILES.values()):
        return {key: nib.load(data / name) for key, name in TEMPLATE_FILES.items()}
    from nilearn import datasets

    return {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
    }


@functools.lru_cache(maxsize=1)
def mni_anatomy() -> Anatomy:
    """GM/WM/CSF fractions from the MNI152 2009 template packaged with nilearn (offline)."""
    images = _template_images()
    maps = {}
    for key, img in images.items():
        data = np.asarray(img.dataobj, dtype=np.float32)
        maps[key] = data / data.max()  # as nilearn does: each map rescaled to [0, 1]
    brain = (maps["t1"] > 0).astype(np.float32)
    gm, wm = maps["gm"], maps["wm"]
    total = np.maximum(gm + wm, 1.0)  # the two maps overlap slightly at the cortex
    gm, wm = gm / total * brain, wm / total * brain
    # Whatever the brain holds that is neither GM nor WM is CSF (ventricles, sulci).
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    full_affine = np.asarray(images["t1"].affine, dtype=np.float64)
    template = Grid(tuple(int(n) for n in brain.shape), full_affine)
    # Crop to the brain (+2 voxels): half the voxels to filter and keep in memory.
    idx = np.argwhere(brain > 0)
    lo, hi = np.maximum(idx.min(axis=0) - 2, 0), np.minimum(idx.max(axis=0) + 3, brain.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    affine = full_affine @ shift
    tissues = np.stack([gm[crop], wm[crop], csf[crop]]).astype(np.float32)
    brain = brain[crop] > 0
    centre = (affine @ np.append((np.asarray(brain.shape) - 1) / 2.0, 1.0))[:3]
    # Voxels within ~8 mm of the brain: the only ones worth interpolating.
    near = ndimage.binary_dilation(brain[::4, ::4, ::4], iterations=2)
    parenchyma = (tissues[0] + tissues[1]) >= 0.5
    candidates = np.argwhere(parenchyma[::2, ::2, ::2]) * 2
    return Anatomy(tissues, affine, template, centre, near, parenchyma, candidates)


@dataclass(frozen=True)
class SubjectTransform:
    """Where one subject's brain sits in the scanner: template mm -> world mm.

    An affine (`matrix`) plus a smooth displacement made of a few random plane waves,
    applied in template space; evaluated analytically, so it costs a few sines per voxel.
    """

    matrix: np.ndarray  # 4x4, template mm -> world mm
    wavevectors: np.ndarray  # (Q, 3) rad/mm
    phases: np.ndarray  # (Q,)
    amplitudes: np.ndarray  # (Q, 3) mm

    @classmethod
    def random(cls, rng: np.random.Generator, rotation_deg: float, scale: float, shift_mm: float,
               elastic_mm: float, centre: np.ndarray, mean_scale: float = 1.0) -> "SubjectTransform":
        """Rotation up to +-rotation_deg per axis, per-axis scale mean_scale * (1 +- scale),
        shift up to +-shift_mm, elastic displacement of RMS ~elastic_mm."""
        angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
        scales = mean_scale * (1.0 + rng.uniform(-scale, scale, 3))
        linear = _rotation(angles) @ np.diag(scales)
        matrix = np.eye(4)
        matrix[:3, :3] = linear
        # Keep the brain centre near the origin of the scanner plus a small offset.
        matrix[:3, 3] = centre - linear @ centre + rng.uniform(-shift_mm, shift_mm, 3)
        q = 6
        wavelengths = rng.uniform(50.0, 120.0, q)
        directions = rng.normal(size=(q, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavevectors = 2 * np.pi * directions / wavelengths[:, None]
        amplitudes = rng.normal(0.0, elastic_mm / np.sqrt(q), (q, 3))
        return cls(matrix, wavevectors, rng.uniform(0, 2 * np.pi, q), amplitudes)

    def template_points(self, grid: Grid, anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices of the grid voxels near the brain and their template voxel coordinates.

        Most of a field of view is air: a nearest-neighbour look-up in a coarse, dilated
        brain mask drops those voxels before any interpolation.
        """
        to_mm = np.linalg.inv(self.matrix) @ grid.affine  # grid voxel -> template mm (affine part)
        inv = np.linalg.inv(anatomy.affine)
        coarse = _affine_field(np.diag([0.25, 0.25, 0.25, 1.0]) @ inv @ to_mm, grid.shape)
        look = [np.rint(c).astype(np.intp) for c in coarse]
        inside = np.ones(grid.shape, bool)
        for axis, idx in enumerate(look):
            inside &= (idx >= 0) & (idx < anatomy.near_brain.shape[axis])
            np.clip(idx, 0, anatomy.near_brain.shape[axis] - 1, out=idx)
        inside &= anatomy.near_brain[look[0], look[1], look[2]]
        flat = np.flatnonzero(inside)
        ijk = np.vstack([*np.unravel_index(flat, grid.shape), np.ones(flat.size)]).astype(np.float32)
        mm = to_mm.astype(np.float32)[:3] @ ijk
        # The smooth displacement: a few plane waves evaluated in template mm.
        waves = np.sin(self.wavevectors.astype(np.float32) @ mm + self.phases.astype(np.float32)[:, None])
        mm += self.amplitudes.T.astype(np.float32) @ waves
        coords = inv[:3, :3].astype(np.float32) @ mm + inv[:3, 3].astype(np.float32)[:, None]
        return flat, coords


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
    """Folder name of case `index` (0-based): sub-strokecase0001, or sub-r001s001 for ATLAS."""
    if layout == "atlas":
        return f"sub-r{1 + index // 999:03d}s{1 + index % 999:03d}"
    return f"sub-strokecase{index + 1:04d}"


def synth_case(index: int, layout: str = "isles22", seed: int = 0) -> SynthCase:
    """Draw case `index` of the dataset with `seed` (independent of how many are drawn)."""
    _check_layout(layout)
    if int(seed) < 0 or int(index) < 0:
        raise StrokeRayError(f"seed and case index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([int(seed), int(index), LAYOUTS.index(layout)])
    anatomy = mni_anatomy()
    centre = anatomy.centre
    lesion_class = LESION_CLASSES[index % len(LESION_CLASSES)]

    if layout == "atlas":
        # ATLAS images are registered to MNI: only residual misregistration remains.
        transform = SubjectTransform.random(rng, 1.5, 0.03, 1.0, 1.0, centre)
        grids = {"t1w": Grid(anatomy.template.shape, anatomy.template.affine.copy())}
        reference = "t1w"
    else:
        # The template brain (1.9 l inside its mask) is larger than a typical stroke
        # patient's (the real ISLES'22 sample: 1.45 l): shrink by 8 % on average.
        transform = SubjectTransform.random(rng, 4.0, 0.08, 4.0, 2.0, centre, mean_scale=BRAIN_SCALE)
        grids = _isles_grids(rng, transform.matrix[:3, :3] @ centre + transform.matrix[:3, 3])
        reference = "dwi"

    lesion, lesion_box, lesions = _lesion_map(anatomy, rng, lesion_class)
    factors = {m: float(rng.uniform(*CONTRASTS[m].lesion)) for m in grids}
    mismatch = layout == "isles22" and rng.random() < FLAIR_MISMATCH_P
    if mismatch:
        factors["flair"] = float(rng.uniform(1.0, 1.04))

    images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sampled: dict[bytes, Sampled] = {}
    for modality, grid in grids.items():
        key = grid.affine.tobytes() + np.asarray(grid.shape).tobytes()
        if key not in sampled:  # DWI and ADC share a grid: sample the anatomy once
            sampled[key] = _sample_anatomy(anatomy, transform, grid, lesion, lesion_box)
        values = _render(modality, sampled[key], factors[modality], rng)
        images[modality] = (sampled[key].volume(values), grid.affine)
    ref = sampled[grids[reference].affine.tobytes() + np.asarray(grids[reference].shape).tobytes()]
    dtype = np.uint16 if layout == "isles22" else np.uint8  # as the real releases store them
    mask = ref.volume(ref.lesion >= 0.5, dtype)
    if not mask.any():  # a dot may cover under half of every voxel: keep its peak voxel
        mask.flat[ref.flat[int(np.argmax(ref.lesion))]] = 1

    voxel_ml = float(np.abs(np.linalg.det(grids[reference].affine[:3, :3]))) / 1000.0
    info = {
        "lesion_class": lesion_class,
        "lesions": lesions,
        "lesion_ml": round(float(mask.sum()) * voxel_ml, 3),
        "lesion_factor": {m: round(f, 3) for m, f in factors.items()},
        "flair_mismatch": bool(mismatch),
    }
    return SynthCase(subject_id(index, layout), layout, images, mask, grids[reference].affine,
                     lesion_class, info)


def write_case(case: SynthCase, root: str | Path, seed: int = 0) -> list[Path]:
    """Write `case` under `root` in its layout's file names (each file atomically)."""
    root = Path(root)
    sub = case.subject
    written = []
    if case.layout == "atlas":
        folder = root / sub / "ses-1" / "anat"
        prefix = f"{sub}_ses-1_{ATLAS_SPACE}"
        image, affine = case.images["t1w"]
        written.append(_write_nifti(folder / f"{prefix}_T1w.nii.gz", image, affine))
        written.append(_write_json(folder / f"{prefix}_T1w.json", _sidecar("t1w", affine, seed, case)))
        written.append(_write_nifti(folder / f"{prefix}_label-L_desc-T1lesion_mask.nii.gz",
                                    case.mask, case.mask_affine))
        return written
    raw = root / "rawdata" / sub / "ses-0001"
    for modality, (image, affine) in case.images.items():
        stem = f"{sub}_ses-0001_{modality}"
        written.append(_write_nifti(raw / f"{stem}.nii.gz", image, affine))
        written.append(_write_json(raw / f"{stem}.json", _sidecar(modality, affine, seed, case)))
    deriv = root / "derivatives" / sub / "ses-0001"
    written.append(_write_nifti(deriv / f"{sub}_ses-0001_msk.nii.gz", case.mask, case.mask_affine))
    return written


def generate_dataset(
    output: str | Path,
    num_cases: int = 8,
    layout: str = "isles22",
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Write `num_cases` synthetic cases in the ISLES'22 or ATLAS R2.0 layout; return subject ids.

    The same (seed, case index) always gives byte-identical files, and every file is
    written under a temporary name and renamed, so an interrupted run leaves no partial
    file and re-running it completes the dataset.
    """
    _check_layout(layout)
    if int(num_cases) < 1:
        raise StrokeRayError(f"num_cases must be at least 1, got {num_cases}")
    root = Path(output)
    if root.exists() and not root.is_dir():
        raise InputFileError(root, "exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    _write_text(root / "README.md", _readme(layout))
    _write_json(root / "dataset_description.json", _description(layout, seed))

    from tqdm.auto import tqdm

    mni_anatomy()  # load before the bar starts, so the bar shows the per-case rate
    subjects = []
    for index in tqdm(range(int(num_cases)), desc=f"synth {layout}", unit="case", disable=not progress):
        case = synth_case(index, layout=layout, seed=seed)
        write_case(case, root, seed=seed)
        subjects.append(case.subject)
    return subjects


# ----------------------------------------------------------------------------- geometry


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise StrokeRayError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine_field(matrix: np.ndarray, shape: tuple[int, int, int], rows: int = 3) -> list[np.ndarray]:
    """matrix @ (i, j, k, 1) for every voxel, as `rows` float32 arrays (by broadcasting)."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    out = []
    for r in range(rows):
        a = np.float32(matrix[r, 0]) * i[:, None, None] + np.float32(matrix[r, 3])
        b = np.float32(matrix[r, 1]) * j[None, :, None]
        c = np.float32(matrix[r, 2]) * k[None, None, :]
        out.append((a + b) + c)
    return out


def _grid_around(centre: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 angles_deg: np.ndarray) -> Grid:
    """A LAS grid (first axis right-to-left, like the ISLES'22 files) centred on `centre`."""
    direction = _rotation(np.deg2rad(angles_deg)) @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return Grid(tuple(int(s) for s in shape), np.round(affine, 6))


def _isles_grids(rng: np.random.Generator, brain_centre: np.ndarray) -> dict[str, Grid]:
    """DWI/ADC on one ~2 mm grid; FLAIR on its own thin in-plane, 5 mm slice grid."""
    # Slices are often tilted along the AC-PC line: a pitch of up to ~12 degrees.
    tilt = np.array([rng.uniform(-12.0, 12.0), rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0)])
    inplane = round(float(rng.uniform(1.9, 2.1)), 3)
    slice_mm = float(rng.choice([2.0, 2.0, 2.2]))
    matrix = int(rng.choice([104, 112, 112, 120]))
    n_slices = int(round(146.0 / slice_mm)) + int(rng.integers(-2, 3))
    dwi = _grid_around(brain_centre + rng.uniform(-5, 5, 3), (matrix, matrix, n_slices),
                       (inplane, inplane, slice_mm), tilt)
    # FLAIR: 256 x 256 at ~0.9 mm in-plane (the real scans are often 512 x 512 at 0.45 mm;
    # half the matrix keeps generation fast and still 2x finer than DWI), 5 mm slices,
    # planned a little differently from the DWI.
    flair_inplane = round(float(rng.uniform(0.86, 0.94)), 3)
    flair = _grid_around(brain_centre + rng.uniform(-6, 6, 3), (256, 256, 29 + int(rng.integers(-2, 3))),
                         (flair_inplane, flair_inplane, 5.0), tilt + rng.uniform(-3.0, 3.0, 3))
    return {"dwi": dwi, "adc": dwi, "flair": flair}


@dataclass
class Sampled:
    """The anatomy on one grid, kept only at brain voxels (flat indices into the grid)."""

    grid: Grid
    flat: np.ndarray  # (n,) indices of brain voxels
    tissues: np.ndarray  # (3, n) gm, wm, csf fractions
    lesion: np.ndarray  # (n,) lesion fraction

    def volume(self, values: np.ndarray, dtype=np.float32) -> np.ndarray:
        out = np.zeros(self.grid.shape, dtype)
        out.flat[self.flat] = values
        return out


def _sample_anatomy(anatomy: Anatomy, transform: SubjectTransform, grid: Grid, lesion: np.ndarray,
                    lesion_box: tuple[slice, ...]) -> Sampled:
    """Tissue and lesion fractions on `grid`, at the voxels where tissue is >= 50 %."""
    flat, coords = transform.template_points(grid, anatomy)
    # Footprint of one grid voxel in template voxels; the grid axes stay within ~16 degrees
    # of the template's, so a separable pre-filter along the template axes is close
    # enough, and depending on the nominal spacing only lets all cases share it.
    footprint = _spacing(grid.affine) / _spacing(anatomy.affine)
    smoothed = anatomy.smoothed(tuple(np.maximum(0.0, (footprint - 1.0) / 2.0)))
    tissues = np.stack([
        ndimage.map_coordinates(t, coords, order=1, mode="constant", cval=0.0, prefilter=False)
        for t in smoothed
    ])
    brain = tissues.sum(axis=0) >= 0.5
    flat, coords, tissues = flat[brain], coords[:, brain], tissues[:, brain]
    les = np.zeros(flat.size, np.float32)
    # Lesions are small: interpolate only the points inside their bounding box.
    near = np.ones(flat.size, bool)
    for axis, sl in enumerate(lesion_box):
        near &= (coords[axis] > sl.start - 1) & (coords[axis] < sl.stop)
    if near.any():
        les[near] = ndimage.map_coordinates(lesion, coords[:, near], order=1, mode="constant", cval=0.0,
                                            prefilter=False)
    return Sampled(grid, flat, tissues, les)


# ----------------------------------------------------------------------------- lesions


def _lesion_map(anatomy: Anatomy, rng: np.random.Generator, lesion_class: str
                ) -> tuple[np.ndarray, tuple[slice, ...], list]:
    """Soft lesion fraction on the (cropped) template grid, its bounding box, and a
    description of each lesion."""
    lesion = np.zeros(anatomy.shape, np.float32)
    described, boxes = [], []
    candidates = anatomy.candidates
    if lesion_class == "lacunar":  # lacunes sit in deep grey/white matter near the centre
        centre_vox = np.linalg.solve(anatomy.affine, np.append(anatomy.centre, 1.0))[:3]
        deep = np.linalg.norm((candidates - centre_vox) * _spacing(anatomy.affine), axis=1) < 30.0
        candidates = candidates[deep]
    side = float(rng.choice([-1.0, 1.0]))

    if lesion_class == "territorial":
        name = str(rng.choice(list(TERRITORIES), p=[0.6, 0.15, 0.15, 0.1]))
        target_ml = float(rng.uniform(15.0, 80.0) if name == "mca" else rng.uniform(10.0, 35.0))
        boxes.append(_add_territorial(lesion, anatomy, rng, name, side, target_ml))
        described.append({"kind": "territorial", "territory": name, "side": "R" if side > 0 else "L",
                          "target_ml": round(target_ml, 2)})
        radii = [(1.5, 3.0)] * int(rng.integers(0, 3))  # satellite embolic dots are common
    elif lesion_class == "embolic":
        radii = [(1.5, 3.0)] * int(rng.integers(2, 7))
    elif lesion_class == "medium":
        radii = [(6.0, 14.0)] + [(1.5, 4.0)] * int(rng.integers(0, 3))
    else:  # lacunar: one small deep lesion, sometimes a second
        radii = [(2.5, 7.0)] * int(rng.integers(1, 3))
    for low, high in radii:
        centre = candidates[int(rng.integers(len(candidates)))].astype(np.float64)
        r = rng.uniform(low, high, 3)
        boxes.append(_add_ellipsoid(lesion, anatomy, centre, r, _rotation(rng.uniform(0, np.pi, 3))))
        described.append({"kind": "ellipsoid", "radii_mm": [round(float(x), 2) for x in r]})
    for box in boxes:  # infarcts are confined to parenchyma (not ventricles, not outside)
        lesion[box] *= anatomy.parenchyma[box]
    union = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
    return lesion, union, described


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _box(centre: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _add_ellipsoid(lesion: np.ndarray, anatomy: Anatomy, centre_vox: np.ndarray, radii_mm: np.ndarray,
                   rotation: np.ndarray) -> tuple[slice, ...]:
    """Paste a soft-edged, randomly oriented ellipsoid (radii in mm) into `lesion`."""
    spacing = _spacing(anatomy.affine)
    box = _box(centre_vox, radii_mm.max() / spacing + 2, lesion.shape)
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    offsets = np.stack([(g - c) * sp for g, c, sp in zip(grids, centre_vox, spacing)], axis=-1)
    local = offsets @ rotation  # coordinates in the ellipsoid's own axes
    radius = np.sqrt(((local / radii_mm) ** 2).sum(axis=-1))
    # ~1 mm soft edge so the boundary partial-volumes on coarser grids.
    soft = np.clip((1.0 - radius) * radii_mm.min() + 0.5, 0.0, 1.0).astype(np.float32)
    np.maximum(lesion[box], soft, out=lesion[box])
    return box


def _add_territorial(lesion: np.ndarray, anatomy: Anatomy, rng: np.random.Generator, territory: str,
                     side: float, target_ml: float) -> tuple[slice, ...]:
    """A large irregular infarct: a smoothed random blob inside one arterial territory."""
    centre_mm, radii_mm = (np.array(v, dtype=np.float64) for v in TERRITORIES[territory])
    centre_mm = centre_mm * np.array([side, 1.0, 1.0]) + rng.uniform(-6.0, 6.0, 3)
    inv = np.linalg.inv(anatomy.affine)
    centre_vox = inv[:3, :3] @ centre_mm + inv[:3, 3]
    spacing = _spacing(anatomy.affine)
    box = _box(centre_vox, radii_mm / spacing + 2, lesion.shape)
    shape = tuple(s.stop - s.start for s in box)
    # Correlated noise (~6 mm) gives an irregular, lobulated outline.
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 6.0 / spacing)
    noise /= noise.std() + 1e-6
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    offsets = np.stack([(g - c) * sp / r for g, c, sp, r in zip(grids, centre_vox, spacing, radii_mm)], -1)
    envelope = (offsets ** 2).sum(axis=-1)  # 1 at the territory's ellipsoidal border
    hemisphere = (np.sign(grids[0] * anatomy.affine[0, 0] + anatomy.affine[0, 3]) == side)
    allowed = anatomy.parenchyma[box] & (envelope <= 1.0) & hemisphere
    score = np.where(allowed, noise - 2.5 * envelope, -np.inf)
    n_voxels = int(target_ml * 1000.0 / np.prod(spacing))
    n_voxels = min(n_voxels, int(allowed.sum()))
    if n_voxels <= 0:
        return box
    threshold = np.partition(score.ravel(), -n_voxels)[-n_voxels]
    blob = (score >= threshold).astype(np.float32)
    # Keep the largest connected piece so it reads as one infarct, then soften its edge.
    labels, count = ndimage.label(blob)
    if count > 1:
        sizes = ndimage.sum_labels(blob, labels, index=np.arange(1, count + 1))
        blob = (labels == 1 + int(np.argmax(sizes))).astype(np.float32)
    blob = ndimage.gaussian_filter(blob, 0.7)
    np.maximum(lesion[box], np.clip((blob - 0.5) * 2.0 + 0.5, 0.0, 1.0), out=lesion[box])
    return box


# ----------------------------------------------------------------------------- intensities


def _render(modality: str, points: Sampled, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Intensities of one modality at the sampled brain voxels (outside stays 0, as the
    skull-stripped ISLES'22 release)."""
    c = CONTRASTS[modality]
    jitter = rng.uniform(0.92, 1.08, 3)
    gain = 1.0 + rng.uniform(-c.gain, c.gain) if c.gain else 1.0
    values = (np.array([c.gm, c.wm, c.csf]) * jitter * gain).astype(np.float32)
    image = values @ points.tissues
    image *= 1.0 + np.float32(factor - 1.0) * points.lesion
    if c.gain:  # coil sensitivity: a magnitude-image effect, not in computed ADC maps
        image *= _bias_field(points, rng)
    sigma = np.float32(c.noise * c.wm * gain)
    n1 = rng.standard_normal(image.size, dtype=np.float32) * sigma
    if c.rician:
        n2 = rng.standard_normal(image.size, dtype=np.float32) * sigma
        return np.sqrt((image + n1) ** 2 + n2 ** 2)
    return image + n1


def _bias_field(points: Sampled, rng: np.random.Generator) -> np.ndarray:
    """exp of a random quadratic in world position (per 100 mm): about +-15 % across the head."""
    grid = points.grid
    ijk = np.vstack([*np.unravel_index(points.flat, grid.shape), np.ones(points.flat.size)])
    centre = (np.asarray(grid.shape) - 1) / 2.0
    rel = (grid.affine[:3, :3] / 100.0).astype(np.float32) @ (ijk[:3] - centre[:, None]).astype(np.float32)
    x, y, z = rel
    a = rng.normal(0.0, 0.08, 9).astype(np.float32)
    log = a[0] * x + a[1] * y + a[2] * z + a[3] * x * y + a[4] * y * z + a[5] * x * z
    log += a[6] * x * x + a[7] * y * y + a[8] * z * z
    return np.exp(log)


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden temporary name with a foreign suffix: dataset discovery never picks it up.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # Own gzip with a fixed header time, so identical arrays give identical files.
    return _atomic_write(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _write_json(path: Path, payload: dict) -> Path:
    return _atomic_write(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def _write_text(path: Path, text: str) -> Path:
    return _atomic_write(path, text.encode())


def _sidecar(modality: str, affine: np.ndarray, seed: int, case: SynthCase) -> dict:
    spacing = _spacing(affine)
    sidecar = {
        "Synthetic": True,
        "GeneratedBy": "stroke-ray synth",
        "Seed": int(seed),
        "Modality": "MR",
        "MagneticFieldStrength": 3.0,
        "VoxelSizeMm": [round(float(s), 4) for s in spacing],
        "SyntheticLesion": case.info,
    }
    if modality == "dwi":
        sidecar["DiffusionBValue"] = 1000.0
    if modality == "adc":
        sidecar["Units"] = "1e-3 mm^2/s"
    if modality == "flair":
        sidecar.update(SliceThickness=4.0, SpacingBetweenSlices=5.0, InversionTime=2850.0)
    return sidecar


def _description(layout: str, seed: int) -> dict:
    return {
        "Name": f"stroke-ray synthetic {'ISLES22' if layout == 'isles22' else 'ATLAS R2.0'}-like stroke cases",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "Synthetic": True,
        "GeneratedBy": [{"Name": "stroke-ray synth", "Description": f"layout={layout} seed={seed}"}],
        "License": "synthetic; anatomy from the ICBM 2009a template under the MNI/McGill notice in README.md",
    }


def _readme(layout: str) -> str:
    files = (
        "rawdata/sub-strokecaseNNNN/ses-0001/sub-strokecaseNNNN_ses-0001_{dwi,adc,flair}.nii.gz\n"
        "    derivatives/sub-strokecaseNNNN/ses-0001/sub-strokecaseNNNN_ses-0001_msk.nii.gz"
        if layout == "isles22" else
        f"sub-rXXXsYYY/ses-1/anat/sub-rXXXsYYY_ses-1_{ATLAS_SPACE}_T1w.nii.gz\n"
        f"    sub-rXXXsYYY/ses-1/anat/sub-rXXXsYYY_ses-1_{ATLAS_SPACE}_label-L_desc-T1lesion_mask.nii.gz"
    )
    return (
        "# Synthetic stroke dataset (NOT patient data)\n\n"
        "Every image here is synthetic, made by `stroke-ray synth` from the MNI ICBM152 2009\n"
        "template tissue maps with simulated lesions, bias field and noise. No patient data.\n"
        "Use it to exercise the pipeline, never to judge clinical performance.\n\n"
        f"Layout:\n\n    {files}\n\n"
        "Anatomy: MNI ICBM152 2009a nonlinear symmetric template (1 mm T1, GM and WM maps) as\n"
        "packaged by nilearn. Cite: Fonov et al., NeuroImage 54(1):313-327 (2011); Fonov et al.,\n"
        "NeuroImage 47:S102 (2009).\n\n"
        "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal\n"
        "Neurological Institute, McGill University. Permission to use, copy, modify, and\n"
        "distribute this software and its documentation for any purpose and without fee is\n"
        "hereby granted, provided that the above copyright notice appear in all copies. The\n"
        "authors and McGill University make no representations about the suitability of this\n"
        "software for any purpose. It is provided \"as is\" without express or implied warranty.\n"
    )
