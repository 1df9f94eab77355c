"""The `stroke-ray` command line: one sub-command per pipeline stage.

    stroke-ray synth    make synthetic ISLES'22- or ATLAS-like cases
    stroke-ray convert  NIfTI dataset -> Zarr store
    stroke-ray train    one training run on Ray Train
    stroke-ray tune     a sweep with Ray Tune + Optuna, tracked in MLflow
    stroke-ray predict  lesion masks for new cases, in their own space
    stroke-ray serve    HTTP prediction service on Ray Serve
    stroke-ray demo     the whole pipeline on a small synthetic dataset

Every command reports a bad input as one line naming the file and the problem and exits
non-zero; module functions raise `StrokeRayError`, this file turns it into that line.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from stroke_ray.errors import StrokeRayError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distributed training, tuning and serving of 3D stroke-lesion segmentation.",
)


def _user_errors(fn: Callable) -> Callable:
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


@app.command()
@_user_errors
def synth(
    output: Path = typer.Option(..., "-o", "--output", help="Dataset folder to create."),
    n: int = typer.Option(8, "-n", "--num-cases", min=1, help="Number of cases."),
    layout: str = typer.Option("isles22", help="isles22 or atlas."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same cases."),
) -> None:
    """Generate synthetic stroke cases on real MNI152 anatomy."""
    from stroke_ray.synth import generate_dataset

    generate_dataset(output, num_cases=n, layout=layout, seed=seed, progress=True)


@app.command()
@_user_errors
def convert(
    dataset: str = typer.Argument(..., help="Dataset root (ISLES'22 or ATLAS layout)."),
    output: str = typer.Option(..., "-o", "--output", help="Zarr store path or URL."),
    modalities: Optional[str] = typer.Option(
        None, "-m", "--modalities", help="Comma-separated, e.g. dwi,adc,flair (default: all of the layout)."
    ),
    layout: str = typer.Option("auto", help="auto, isles22 or atlas."),
    levels: str = typer.Option("64,128", help="Cubic training resolutions to write."),
    normalization: str = typer.Option("zscore", help="zscore (within brain) or none."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for a local Ray."),
) -> None:
    """Convert a NIfTI dataset into a Zarr store (resumable, parallel on Ray)."""
    from stroke_ray.ingest import convert_dataset

    report = convert_dataset(
        dataset,
        output,
        modalities=modalities.split(",") if modalities else None,
        layout=layout,
        levels=[int(x) for x in levels.split(",") if x],
        normalization=normalization,
        address=address,
        num_cpus=num_cpus,
        progress=True,
    )
    typer.echo(report.summary())
    if report.failed and not report.converted and not report.skipped:
        raise typer.Exit(code=1)


def main() -> None:  # pragma: no cover - console entry point alias
    sys.exit(app())
