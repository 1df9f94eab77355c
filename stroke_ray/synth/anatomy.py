"""MNI152 anatomy on any acquisition grid: the template tissue maps, a subject's placement
in the scanner, and sampling both onto a grid with partial volume."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from stroke_ray.errors import StrokeRayError
from stroke_ray.grid import spacing_of

__all__ = ["Anatomy", "Grid", "Sampled", "SubjectTransform", "TEMPLATE_FILES", "mni_anatomy", "rotation",
           "sample_anatomy"]


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

    def depth_mm(self) -> np.ndarray:
        """Distance of each template voxel from the brain's outer surface, mm (0 outside)."""
        if "depth" not in self._smoothed:  # computed once, only when artefacts ask for it
            brain = self.tissues.sum(axis=0) >= 0.5
            self._smoothed["depth"] = ndimage.distance_transform_edt(
                brain, sampling=spacing_of(self.affine)).astype(np.float32)
        return self._smoothed["depth"]


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
        linear = rotation(angles) @ np.diag(scales)
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


def rotation(angles: np.ndarray) -> np.ndarray:
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


@dataclass
class Sampled:
    """The anatomy on one grid, kept only at brain voxels (flat indices into the grid)."""

    grid: Grid
    flat: np.ndarray  # (n,) indices of brain voxels
    tissues: np.ndarray  # (3, n) gm, wm, csf fractions
    lesion: np.ndarray  # (n,) lesion fraction
    coords: np.ndarray  # (3, n) float32 template voxel coordinates of the voxels

    def volume(self, values: np.ndarray, dtype=np.float32) -> np.ndarray:
        out = np.zeros(self.grid.shape, dtype)
        out.flat[self.flat] = values
        return out


def sample_anatomy(anatomy: Anatomy, transform: SubjectTransform, grid: Grid, lesion: np.ndarray,
                    lesion_box: tuple[slice, ...]) -> Sampled:
    """Tissue and lesion fractions on `grid`, at the voxels where tissue is >= 50 %."""
    flat, coords = transform.template_points(grid, anatomy)
    # Footprint of one grid voxel in template voxels, along the template axis each voxel
    # axis runs closest to (grids may store their axes in any order). The axes stay
    # within ~25 degrees of the template's, so a separable pre-filter along the template
    # axes is close enough, and depending on the nominal spacing only lets all cases share it.
    nearest_axis = np.argmax(np.abs(grid.affine[:3, :3]), axis=0)  # world axis of each voxel axis
    spacing = np.empty(3)
    spacing[nearest_axis] = spacing_of(grid.affine)
    footprint = spacing / spacing_of(anatomy.affine)
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
    return Sampled(grid, flat, tissues, les, coords)

