"""Voxel grids and resampling between them.

A grid is a shape plus a 4x4 voxel-to-world affine (RAS+ millimetres, as in NIfTI). All
resampling goes through the two affines with `scipy.ndimage.affine_transform`, the same
engine nibabel.processing and nilearn use, so a volume and its mask always land where the
scanner put them, whatever the orientation or voxel size of either grid.
"""

from __future__ import annotations

import math
import re

import nibabel as nib
import numpy as np
from scipy import ndimage

from stroke_ray.metrics import label_lesions  # a leaf module: no cycle through grid

__all__ = [
    "NATIVE",
    "LevelSpec",
    "parse_level",
    "spacing_level_name",
    "spacing_of",
    "cube_affine",
    "foreground_box",
    "spacing_grid",
    "level_grid",
    "resample",
    "resample_mask",
    "keep_lost_components",
    "orientation_code",
]

NATIVE = "native"
# Margin kept around the non-zero region when a physical-spacing level is cropped to it:
# a few voxels of air around the brain, so that patches at the edge see the edge.
CROP_MARGIN_MM = 4.0
_SPACING_LEVEL = re.compile(r"^(?P<mm>\d+(?:\.\d+)?)mm$")


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each voxel axis."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


class LevelSpec(tuple):
    """A parsed level name: ("native", None), ("cube", edge) or ("spacing", mm)."""

    __slots__ = ()

    def __new__(cls, kind: str, value: float | int | None):
        return super().__new__(cls, (kind, value))

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def value(self):
        return self[1]


def parse_level(level: str | int) -> LevelSpec:
    """What a store level name means.

    "native" is the reference modality's own grid; an integer ("64", "128") is a cube of that
    edge holding the whole field of view (the seed study's levels); "<s>mm" ("2mm", "1.5mm")
    is an isotropic grid of s millimetres cropped to the non-zero region (nnU-Net's
    physical-spacing preprocessing).

    Raises:
        ValueError: for any other name.
    """
    name = str(level).strip()
    if name == NATIVE:
        return LevelSpec("native", None)
    if name.isdigit() and int(name) >= 4:
        return LevelSpec("cube", int(name))
    m = _SPACING_LEVEL.match(name)
    if m and 0.1 <= float(m["mm"]) <= 20.0:
        return LevelSpec("spacing", float(m["mm"]))
    raise ValueError(
        f"unknown level {name!r}: use 'native', a cube edge such as '64' or '128', "
        "or a spacing such as '2mm' or '1.5mm' (0.1-20 mm)"
    )


def spacing_level_name(mm: float) -> str:
    """The level name of an isotropic spacing: 2.0 -> "2mm", 1.5 -> "1.5mm"."""
    mm = float(mm)
    if not 0.1 <= mm <= 20.0:
        raise ValueError(f"spacing must be between 0.1 and 20 mm, got {mm}")
    return f"{mm:g}mm"


def cube_affine(shape: tuple[int, ...], affine: np.ndarray, size: int) -> np.ndarray:
    """Affine of a `size`^3 isotropic grid holding the whole field of view of (shape, affine).

    The voxel size is the longest physical extent divided by `size`, so the aspect ratio is
    kept (no anisotropic squashing) and the short axes are padded; axis directions follow
    the source grid and both grids share their centre.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape3 = np.asarray(shape[:3], dtype=np.float64)
    spacing = spacing_of(affine)
    voxel = float((shape3 * spacing).max() / size)
    directions = affine[:3, :3] / spacing
    out = np.eye(4)
    out[:3, :3] = directions * voxel
    src_centre = affine @ np.append((shape3 - 1) / 2.0, 1.0)
    dst_centre_vox = np.full(3, (size - 1) / 2.0)
    out[:3, 3] = src_centre[:3] - out[:3, :3] @ dst_centre_vox
    return out


def foreground_box(image: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Voxel bounding box [lo, hi) of the voxels that are non-zero in any channel.

    `image` is (C, X, Y, Z) or (X, Y, Z). An all-zero image gives the whole grid. This is
    nnU-Net's crop to the non-zero region: skull-stripped MRI is zero outside the brain.
    """
    data = np.asarray(image)
    nonzero = np.any(data != 0, axis=0) if data.ndim == 4 else data != 0
    shape = nonzero.shape
    if not nonzero.any():
        return (0, 0, 0), tuple(int(s) for s in shape)  # type: ignore[return-value]
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(nonzero.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def spacing_grid(
    shape: tuple[int, ...],
    affine: np.ndarray,
    spacing: float,
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
    margin_mm: float = CROP_MARGIN_MM,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An isotropic grid of `spacing` mm covering `box` (default: the whole grid) of (shape, affine).

    Axis directions follow the source grid (no reorientation: the slice axis stays the last
    axis, which the (2+1)D network relies on); the new grid is centred on the box, padded by
    `margin_mm` on every side, and holds the box's whole physical extent.
    """
    affine = np.asarray(affine, dtype=np.float64)
    src_spacing = spacing_of(affine)
    lo, hi = box if box is not None else ((0, 0, 0), tuple(int(s) for s in shape[:3]))
    lo_v, hi_v = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    # Physical extent of the box along each source axis, voxel centres to voxel edges.
    extent = (hi_v - lo_v) * src_spacing + 2.0 * margin_mm
    out_shape = tuple(max(1, int(math.ceil(e / spacing - 1e-6))) for e in extent)
    directions = affine[:3, :3] / src_spacing
    out = np.eye(4)
    out[:3, :3] = directions * float(spacing)
    centre_vox = (lo_v + hi_v - 1.0) / 2.0
    centre = affine @ np.append(centre_vox, 1.0)
    out[:3, 3] = centre[:3] - out[:3, :3] @ ((np.asarray(out_shape, np.float64) - 1.0) / 2.0)
    return out_shape, out  # type: ignore[return-value]


def level_grid(
    level: str | int,
    shape: tuple[int, ...],
    affine: np.ndarray,
    image: np.ndarray | None = None,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of training level `level` for a case on (shape, affine).

    The one place that turns a level name into a grid: ingest writes levels with it and
    prediction and validation map cases onto their training level with it, so the two can
    never disagree. Physical-spacing levels are cropped to the non-zero region of `image`
    (the case's (C, X, Y, Z) reference-grid image), when given.
    """
    spec = parse_level(level)
    shape3 = tuple(int(s) for s in shape[:3])
    if spec.kind == "native":
        return shape3, np.asarray(affine, dtype=np.float64)  # type: ignore[return-value]
    if spec.kind == "cube":
        n = int(spec.value)
        return (n, n, n), cube_affine(shape3, affine, n)
    box = foreground_box(image) if image is not None else None
    return spacing_grid(shape3, affine, float(spec.value), box)


def resample(
    volume: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    order: int = 1,
    cval: float = 0.0,
    antialias: bool = True,
) -> np.ndarray:
    """Resample a 3D `volume` on (src_affine) onto the grid (dst_shape, dst_affine).

    `order` is the spline order (0 nearest, 1 linear, 3 cubic). When the target grid is
    coarser than the source along an axis and `antialias` is set, the source is first
    smoothed with a Gaussian of sigma = (factor - 1) / 2 source voxels (as skimage's
    resize does), so that down-sampling does not alias.
    """
    if volume.ndim != 3:
        raise ValueError(f"resample expects a 3D volume, got shape {volume.shape}")
    src_affine = np.asarray(src_affine, dtype=np.float64)
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    data = np.asarray(volume, dtype=np.float32)
    # dst voxel -> world -> src voxel
    mapping = np.linalg.inv(src_affine) @ dst_affine
    if antialias and order > 0:
        # Source-voxel footprint of one target voxel along each source axis.
        footprint = np.abs(mapping[:3, :3]).sum(axis=1)
        sigma = np.maximum(0.0, (footprint - 1.0) / 2.0)
        if np.any(sigma > 0):
            data = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
    return ndimage.affine_transform(
        data,
        mapping[:3, :3],
        offset=mapping[:3, 3],
        output_shape=tuple(int(s) for s in dst_shape),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=order > 1,
    ).astype(np.float32, copy=False)


def resample_mask(
    mask: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
) -> np.ndarray:
    """Resample a binary mask: linear interpolation of the 0/1 field, then >= 0.5.

    Unlike nearest-neighbour this keeps the lesion volume close to the source's when the
    grids differ by non-integer factors, and it is the inverse-consistent choice for going
    back to a native grid.
    """
    soft = resample(mask.astype(np.float32), src_affine, dst_shape, dst_affine, order=1, antialias=False)
    out = (soft >= 0.5).astype(np.uint8)
    keep_lost_components(mask.astype(np.float32), src_affine, out, dst_affine, threshold=0.5)
    return out


def keep_lost_components(
    src: np.ndarray,
    src_affine: np.ndarray,
    dst: np.ndarray,
    dst_affine: np.ndarray,
    threshold: float = 0.5,
) -> int:
    """Give back to `dst` (in place) every lesion of `src` that resampling made vanish.

    A lesion of a few voxels falls below `threshold` when it is resampled onto a grid
    offset by half a voxel or coarser along an axis (a 2 mm dot on 5 mm slices, a 1-voxel
    lesion on a 2 mm grid shifted by 1 mm): interpolation spreads it over neighbours and
    none of them reaches the threshold. Each connected component of `src >= threshold`
    (26-connected, as the metrics count lesions) that has no voxel `>= threshold` in `dst`
    where its own voxels land gets the `dst` voxel holding its peak (its highest value; for
    a binary mask its voxel nearest its centroid) raised to that peak value. Components that
    land outside `dst` are left out. Large lesions, which survive resampling, are untouched.

    Args:
        src: the 3D source values (a mask as 0/1 or a probability map).
        src_affine, dst_affine: voxel-to-world of the two grids.
        dst: the resampled values on the destination grid, changed in place.
        threshold: what counts as lesion in both.
    Returns:
        How many components were given back.
    """
    labels, n = label_lesions(np.asarray(src) >= threshold)
    if n == 0:
        return 0
    coords = np.argwhere(labels > 0)
    ids = labels[tuple(coords.T)]
    values = np.asarray(src)[tuple(coords.T)].astype(np.float64)
    mapping = np.linalg.inv(np.asarray(dst_affine, np.float64)) @ np.asarray(src_affine, np.float64)
    target = np.rint(coords @ mapping[:3, :3].T + mapping[:3, 3]).astype(np.int64)
    inside = np.all((target >= 0) & (target < np.asarray(dst.shape)), axis=1)
    hit = np.zeros(len(coords), bool)
    hit[inside] = np.asarray(dst)[tuple(target[inside].T)] >= threshold
    found = np.zeros(n + 1, bool)
    np.logical_or.at(found, ids, hit)
    lost = ~found
    lost[0] = False
    chosen = lost[ids] & inside
    if not chosen.any():
        return 0
    coords, ids, values, target = coords[chosen], ids[chosen], values[chosen], target[chosen]
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, ids, values)
    top = values >= peak[ids]  # every component's peak voxels (all of a binary lesion)
    # Among a component's peak voxels, the one nearest the peak voxels' centroid.
    counts = np.bincount(ids[top], minlength=n + 1).astype(np.float64)
    centre = np.stack([np.bincount(ids[top], weights=coords[top, a], minlength=n + 1) for a in range(3)], 1)
    centre /= np.maximum(counts, 1.0)[:, None]
    distance = np.where(top, ((coords - centre[ids]) ** 2).sum(axis=1), np.inf)
    order = np.lexsort((distance, ids))  # by component, nearest first
    first = order[np.r_[True, ids[order][1:] != ids[order][:-1]]]
    for index in first:
        voxel = tuple(target[index])
        dst[voxel] = max(dst[voxel], np.asarray(values[index], dtype=dst.dtype))
    given = len(first)
    return given


def orientation_code(affine: np.ndarray) -> str:
    """Axis codes such as 'LAS' or 'RAS' for the voxel axes of `affine`."""
    return "".join(nib.aff2axcodes(np.asarray(affine)))
