"""The `stroke-ray` commands that apply a trained model: predict, serve, export.

Each takes a model reference (a checkpoint, `models:/name@alias`, `models:/name/N` or
`runs:/<id>/path`; the champion by default where that makes sense); cli.py registers them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from stroke_ray.cli_common import (
    MAX_DIM_OPTION,
    MAX_IMAGE_GIB_OPTION,
    RESAMPLE_MASKS_OPTION,
    VOXEL_RANGE_OPTION,
    limit_options,
    limits,
    user_errors,
)
from stroke_ray.errors import StrokeRayError
from stroke_ray.model_ref import CHAMPION_URI
from stroke_ray.uploads import MAX_DECODE_RATIO, UPLOAD_IMAGE_LIMITS

__all__ = ["COMMANDS", "export", "predict", "serve"]


def _axes(text: str) -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2); checked by config.mirror_axes where the axes are used."""
    try:
        return tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise StrokeRayError(f"--tta-axes: {text!r} is not a comma-separated list of 0, 1, 2") from None


# serve's image limits default to the upload limits (uploads.py says why they are smaller
# than convert's and predict's).
SERVE_MAX_DIM_OPTION, SERVE_MAX_IMAGE_GIB_OPTION, SERVE_VOXEL_RANGE_OPTION = limit_options(
    UPLOAD_IMAGE_LIMITS,
    "Largest decoded uploaded image, in GiB (smaller than convert's and predict's 2 GiB: uploads come "
    "from clients, and a replica holds every image of its concurrent requests in memory at once).",
)


@user_errors
def predict(
    input: Optional[Path] = typer.Option(None, "-i", "--input", help="Dataset folder (any layout convert reads)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for masks and predictions.csv/json."),
    model: str = typer.Option(
        CHAMPION_URI, "-m", "--model",
        help="Checkpoint file/dir, models:/name@alias, models:/name/N or runs:/<id>/path.",
    ),
    dwi: Optional[Path] = typer.Option(None, help="One case: its DWI file."),
    adc: Optional[Path] = typer.Option(None, help="One case: its ADC file."),
    flair: Optional[Path] = typer.Option(None, help="One case: its FLAIR file."),
    t1w: Optional[Path] = typer.Option(None, help="One case: its T1w file (ATLAS models)."),
    mask: Optional[Path] = typer.Option(None, help="One case: its ground-truth mask, for metrics."),
    probability: bool = typer.Option(False, "--probability", help="Also write <subject>_prob.nii.gz."),
    threshold: Optional[float] = typer.Option(
        None, min=0.0, max=1.0, help="Probability threshold of the mask (default: the model's, else 0.5)."
    ),
    min_lesion_ml: Optional[float] = typer.Option(
        None, min=0.0, help="Remove lesions smaller than this, in ml (default: the model's choice; 0 = keep all)."
    ),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Mirroring test-time augmentation."),
    tta_axes: str = typer.Option("0,1,2", help="Axes to mirror with --tta (0,1,2 = x,y,z; 8 flips for all three)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: GPU if present)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for models:/ and runs:/."),
    max_dim: int = MAX_DIM_OPTION,
    max_image_gib: float = MAX_IMAGE_GIB_OPTION,
    voxel_range_mm: str = VOXEL_RANGE_OPTION,
    resample_masks: bool = RESAMPLE_MASKS_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in OUTPUT."),
) -> None:
    """Predict lesion masks for new cases, written in each case's own space."""
    from stroke_ray.predict import predict_dataset

    files = {k: v for k, v in {"dwi": dwi, "adc": adc, "flair": flair, "t1w": t1w}.items() if v is not None}
    if (input is None) == (not files):
        raise StrokeRayError("give either -i DATASET_DIR or the files of one case (--dwi/--adc/--flair or --t1w)")
    report = predict_dataset(
        files or input, model, output, tracking_uri=tracking_uri, save_probability=probability,
        device=device, progress=True, mask=mask, threshold=threshold,
        limits=limits(max_dim, max_image_gib, voxel_range_mm), resample_masks=resample_masks,
        overwrite=overwrite,
        tta_axes=_axes(tta_axes) if tta else (), min_lesion_ml=min_lesion_ml,
    )
    typer.echo(report.summary())
    if report.failed and not report.predicted:
        raise typer.Exit(code=1)


@user_errors
def serve(
    model: str = typer.Option(
        CHAMPION_URI, "-m", "--model",
        help="Checkpoint file/dir, models:/name@alias, models:/name/N or runs:/<id>/path.",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs a token."),
    port: int = typer.Option(8000, help="HTTP port."),
    route_prefix: str = typer.Option(
        "/", help="Path the service answers under; on a cluster shared with other Serve applications "
        "use your own (e.g. /stroke-ray): the token and limits apply to every path under it.",
    ),
    token_file: Optional[Path] = typer.Option(
        None, help="File holding the bearer token (default: $STROKE_RAY_SERVE_TOKEN_FILE, else $STROKE_RAY_SERVE_TOKEN).",
    ),
    replicas: int = typer.Option(1, min=1, help="Fixed number of replicas."),
    min_replicas: Optional[int] = typer.Option(None, min=0, help="Autoscaling: fewest replicas."),
    max_replicas: Optional[int] = typer.Option(None, min=1, help="Autoscaling: most replicas."),
    gpus_per_replica: float = typer.Option(0.0, min=0.0, help="GPUs per replica (fractions share a GPU)."),
    cpus_per_replica: float = typer.Option(1.0, min=0.0, help="CPUs per replica."),
    max_upload_mb: int = typer.Option(512, min=1, help="Largest accepted request body, in MB."),
    body_timeout: float = typer.Option(120.0, min=1.0, help="Seconds within which a whole upload must arrive."),
    max_concurrent: int = typer.Option(1, min=1, help="Predictions running at once per replica."),
    max_queued: int = typer.Option(4, min=0, help="Predictions waiting per replica; more get 503."),
    reload_interval: float = typer.Option(
        60.0, min=0.0, help="Seconds between checks of a models:/name@alias for a new version (0: only on POST /admin/reload).",
    ),
    docs: bool = typer.Option(False, "--docs", help="Serve the OpenAPI page at /docs."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Mirroring test-time augmentation."),
    tta_axes: str = typer.Option("0,1,2", help="Axes to mirror with --tta (0,1,2 = x,y,z)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for models:/ and runs:/."),
    max_dim: int = SERVE_MAX_DIM_OPTION,
    max_image_gib: float = SERVE_MAX_IMAGE_GIB_OPTION,
    voxel_range_mm: str = SERVE_VOXEL_RANGE_OPTION,
    max_decode_ratio: float = typer.Option(
        MAX_DECODE_RATIO, min=1.0,
        help="Most decoded bytes per uploaded byte; a small upload declaring a huge image is refused "
        "(413) as a decompression bomb (real MRI: 4-14x, a plain .nii 1x).",
    ),
) -> None:
    """Serve lesion segmentation over HTTP on Ray Serve (until Ctrl-C)."""
    from stroke_ray.auth import load_token
    from stroke_ray.service import start_server, stop_server

    token = load_token(token_file)
    url = start_server(
        model, host=host, port=port, route_prefix=route_prefix, address=address, tracking_uri=tracking_uri,
        token=token,
        num_replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
        gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
        max_upload_bytes=max_upload_mb * 1024**2, body_timeout_s=body_timeout,
        max_concurrent=max_concurrent, max_queued=max_queued, reload_interval_s=reload_interval, docs=docs,
        tta_axes=_axes(tta_axes) if tta else (),
        image_limits=limits(max_dim, max_image_gib, voxel_range_mm), max_decode_ratio=max_decode_ratio,
    )
    auth = "bearer token required" if token else "no token: loopback only"
    typer.echo(f"serving {model} at {url} (POST /predict, GET /healthz, GET /readyz; {auth}); Ctrl-C to stop")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("stopping the service")
    finally:
        stop_server()


@user_errors
def export(
    model: str = typer.Argument(..., help="Checkpoint file/dir, models:/name@alias, models:/name/N or runs:/<id>/path."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write (a <file>.json describing its input goes beside it)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for models:/ and runs:/."),
) -> None:
    """Export a model to ONNX or TorchScript: a normalised patch in, foreground probability out."""
    from stroke_ray.export import export_model

    result = export_model(model, output, fmt, tracking_uri=tracking_uri)
    typer.echo(f"wrote {result.format} {result.path} ({result.model_version}); input {result.input_name} "
               f"{result.input_layout} with channels {', '.join(result.modalities)}; see {result.path}.json")


# In the order `stroke-ray --help` lists them.
COMMANDS = (predict, serve, export)
