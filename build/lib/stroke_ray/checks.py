"""Value checks after an image is read: what the header could not tell.

`nifti.read_nifti_file` has already checked everything the header declares; these look at
the voxels: values that are not finite or would overflow float32, images with nothing in
them, masks that are not 0/1, and masks whose grid is not the reference modality's. Each
problem is one `InputFileError` naming the file.
"""

from __future__ import annotations

import numpy as np

from stroke_ray.errors import InputFileError
from stroke_ray.grid import resample_mask, spacing_of
from stroke_ray.nifti import NiftiRead

__all__ = ["AFFINE_ATOL", "check_image_values", "check_mask_values", "same_grid", "mask_on_grid"]

# Affines equal to this tolerance (mm) are the same grid (NIfTI stores them as float32).
AFFINE_ATOL = 1e-3
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    """Same shape and the same affine within `AFFINE_ATOL` mm."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, rtol=0, atol=AFFINE_ATOL)


def _check_finite(vol: NiftiRead) -> None:
    data = vol.data
    if data.dtype.kind != "f":
        return  # every integer type fits float32's range
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputFileError(vol.source, f"{bad} NaN/inf voxels")
    if data.dtype.itemsize > 4:
        # float64 values beyond float32's range become inf when the pipeline casts them.
        if data.max() <= _FLOAT32_MAX and data.min() >= -_FLOAT32_MAX:
            return
        count = int(np.count_nonzero(np.abs(data) > _FLOAT32_MAX))
        if count:
            raise InputFileError(
                vol.source, f"{count} voxels exceed the float32 range (largest {float(np.abs(data).max()):.3g}) "
                            "and would become inf"
            )


def check_image_values(vol: NiftiRead) -> None:
    """An image channel: finite, within float32, and not empty.

    Raises:
        InputFileError: NaN/inf voxels, values beyond float32, or every voxel equal.
    """
    _check_finite(vol)
    low, high = vol.data.min(), vol.data.max()
    if low == high:
        raise InputFileError(vol.source, f"every voxel is {float(low):g}: the image is empty")


def check_mask_values(vol: NiftiRead) -> None:
    """A lesion mask: finite and 0/1 (any integer or float type).

    Raises:
        InputFileError: NaN/inf voxels or values other than 0 and 1.
    """
    _check_finite(vol)
    bad = (vol.data != 0) & (vol.data != 1)
    if np.any(bad):
        values = np.unique(vol.data[bad])[:5]
        raise InputFileError(
            vol.source, f"mask is not binary: has values {', '.join(f'{v:g}' for v in values)} besides 0 and 1"
        )


def _grid_text(shape, affine) -> str:
    return f"{tuple(int(s) for s in shape)} at {' x '.join(f'{s:.3g}' for s in spacing_of(affine))} mm"


def mask_on_grid(vol: NiftiRead, shape, affine, reference: str, resample: bool = False) -> np.ndarray:
    """The mask as uint8 on the reference grid (`shape`, `affine`).

    A mask on another grid is an error unless `resample` is set: a mask drawn on another
    grid is more often the wrong file than a deliberate choice, and resampling it changes
    the lesion's voxels.

    Raises:
        InputFileError: another grid (without `resample`), a degenerate affine on another
            grid, or a lesion outside the reference field of view.
    """
    if same_grid(vol.data.shape, vol.affine, shape, affine):
        return vol.data.astype(np.uint8)
    if vol.affine_problem is not None:
        raise InputFileError(
            vol.source,
            f"mask grid {vol.data.shape} does not match the {reference} grid {tuple(shape)} "
            f"and cannot be resampled onto it: {vol.affine_problem}",
        )
    if not resample:
        shift = float(np.abs(np.asarray(vol.affine) - np.asarray(affine)).max())
        detail = (f"{_grid_text(vol.data.shape, vol.affine)} vs {_grid_text(shape, affine)}"
                  if tuple(vol.data.shape) != tuple(shape) else f"affines differ by up to {shift:.3g} mm")
        raise InputFileError(
            vol.source, f"mask grid differs from the {reference} grid ({detail}); pass --resample-masks "
                        f"to resample masks onto the {reference} grid"
        )
    moved = resample_mask(vol.data, vol.affine, shape, affine)
    if np.any(vol.data) and not np.any(moved):
        raise InputFileError(vol.source, f"mask lesion lies outside the {reference} image's field of view")
    return moved
