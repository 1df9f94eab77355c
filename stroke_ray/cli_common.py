"""What every `stroke-ray` command shares: one-line user errors and the input options.

A command wrapped in `user_errors` reports a `StrokeRayError` as one line on stderr and
exits 2; the image-limit options (`--max-dim`, `--max-image-gib`, `--voxel-range-mm`) and
`--resample-masks` read the same on every command that reads images (convert in cli.py,
predict and serve in cli_model.py; serve with smaller defaults).
"""

from __future__ import annotations

import functools
from typing import Callable

import typer

from stroke_ray.errors import StrokeRayError
from stroke_ray.nifti import GIB, ImageLimits

__all__ = [
    "MAX_DIM_OPTION",
    "MAX_IMAGE_GIB_OPTION",
    "RESAMPLE_MASKS_OPTION",
    "VOXEL_RANGE_OPTION",
    "limit_options",
    "limits",
    "user_errors",
]


def limit_options(defaults: ImageLimits, image_gib_help: str = "Largest decoded image file, in GiB.") -> tuple:
    """The `--max-dim`, `--max-image-gib`, `--voxel-range-mm` options with `defaults`' values.

    Args:
        defaults: the limits a command applies when none of the options is given.
        image_gib_help: the help of `--max-image-gib` (serve says why its default is smaller).
    """
    return (
        typer.Option(defaults.max_dim, "--max-dim", help="Largest image size per axis, in voxels."),
        typer.Option(defaults.max_decoded_bytes / GIB, "--max-image-gib", help=image_gib_help),
        typer.Option(f"{defaults.min_voxel_mm:g},{defaults.max_voxel_mm:g}", "--voxel-range-mm",
                     help="Allowed voxel sizes MIN,MAX in mm."),
    )


# What an image header may declare, the same options on every command that reads images
# (`nifti.ImageLimits` validates them; `limits` builds it). convert and predict share these
# defaults; serve builds its own from `uploads.UPLOAD_IMAGE_LIMITS`.
MAX_DIM_OPTION, MAX_IMAGE_GIB_OPTION, VOXEL_RANGE_OPTION = limit_options(ImageLimits())

RESAMPLE_MASKS_OPTION = typer.Option(
    False, "--resample-masks", help="Resample a mask on another grid than its reference modality (else an error).",
)


def limits(max_dim: int, max_image_gib: float, voxel_range_mm: str) -> ImageLimits:
    """The `ImageLimits` of the three image-limit options.

    Raises:
        ConfigError: a limit out of range, or a `--voxel-range-mm` that is not MIN,MAX.
    """
    return ImageLimits.from_cli(max_dim, max_image_gib, voxel_range_mm)


def user_errors(fn: Callable) -> Callable:
    """Turn StrokeRayError (and a Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StrokeRayError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; completed work is kept, re-run to resume", err=True)
            raise typer.Exit(code=130) from None

    return wrapper
