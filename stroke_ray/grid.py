"""Voxel grids and resampling between them.

A grid is a shape plus a 4x4 voxel-to-world affine (RAS+ millimetres, as in NIfTI). All
resampling goes through the two affines with `scipy.ndimage.affine_transform`, the same
engine nibabel.processing and nilearn use, so a volume and its mask always land where the
scanner put them, whatever the orientation or voxel size of either grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "cube_affine",
    "orientation_code",
    "resample",
    "resample_mask",
    "spacing_of",
]


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each voxel axis."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


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
    return (soft >= 0.5).astype(np.uint8)


def orientation_code(affine: np.ndarray) -> str:
    """Axis codes such as 'LAS' or 'RAS' for the voxel axes of `affine`."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine)))
