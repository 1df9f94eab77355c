"""Lesions on the 1 mm template grid: territorial infarcts, embolic dots, medium and lacunar
lesions, soft-edged and confined to parenchyma."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from stroke_ray.grid import spacing_of
from stroke_ray.synth.anatomy import Anatomy, rotation
from stroke_ray.synth.settings import PROFILES, SynthSettings

__all__ = ["LESION_CLASSES", "TERRITORIES", "lesion_map"]

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


def lesion_map(anatomy: Anatomy, rng: np.random.Generator, lesion_class: str,
               settings: SynthSettings = PROFILES["train"]) -> tuple[np.ndarray, tuple[slice, ...], list]:
    """Soft lesion fraction on the (cropped) template grid, its bounding box, and a
    description of each lesion."""
    lesion = np.zeros(anatomy.shape, np.float32)
    described, boxes = [], []
    candidates = anatomy.candidates
    if lesion_class == "lacunar":  # lacunes sit in deep grey/white matter near the centre
        centre_vox = np.linalg.solve(anatomy.affine, np.append(anatomy.centre, 1.0))[:3]
        deep = np.linalg.norm((candidates - centre_vox) * spacing_of(anatomy.affine), axis=1) < 30.0
        candidates = candidates[deep]
    side = float(rng.choice([-1.0, 1.0]))
    embolic = tuple(settings.embolic_radius_mm)

    if lesion_class == "territorial":
        name = str(rng.choice(list(TERRITORIES), p=[0.6, 0.15, 0.15, 0.1]))
        target_ml = float(rng.uniform(15.0, 80.0) if name == "mca" else rng.uniform(10.0, 35.0))
        boxes.append(_add_territorial(lesion, anatomy, rng, name, side, target_ml))
        described.append({"kind": "territorial", "territory": name, "side": "R" if side > 0 else "L",
                          "target_ml": round(target_ml, 2)})
        radii = [embolic] * int(rng.integers(0, 3))  # satellite embolic dots are common
    elif lesion_class == "embolic":
        low, high = settings.embolic_count
        radii = [embolic] * int(rng.integers(low, high + 1))
        if settings.embolic_cluster_mm is not None:  # a shower of emboli in one territory
            seed = candidates[int(rng.integers(len(candidates)))]
            near = np.linalg.norm((candidates - seed) * spacing_of(anatomy.affine), axis=1)
            candidates = candidates[near <= settings.embolic_cluster_mm]
    elif lesion_class == "medium":
        radii = [(6.0, 14.0)] + [(1.5, 4.0)] * int(rng.integers(0, 3))
    else:  # lacunar: one small deep lesion, sometimes a second
        radii = [(2.5, 7.0)] * int(rng.integers(1, 3))
    for low, high in radii:
        centre = candidates[int(rng.integers(len(candidates)))].astype(np.float64)
        r = rng.uniform(low, high, 3)
        boxes.append(_add_ellipsoid(lesion, anatomy, centre, r, rotation(rng.uniform(0, np.pi, 3))))
        described.append({"kind": "ellipsoid", "radii_mm": [round(float(x), 2) for x in r]})
    for box in boxes:  # infarcts are confined to parenchyma (not ventricles, not outside)
        lesion[box] *= anatomy.parenchyma[box]
    union = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
    return lesion, union, described


def _box(centre: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _add_ellipsoid(lesion: np.ndarray, anatomy: Anatomy, centre_vox: np.ndarray, radii_mm: np.ndarray,
                   rotation: np.ndarray) -> tuple[slice, ...]:
    """Paste a soft-edged, randomly oriented ellipsoid (radii in mm) into `lesion`."""
    spacing = spacing_of(anatomy.affine)
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
    spacing = spacing_of(anatomy.affine)
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

