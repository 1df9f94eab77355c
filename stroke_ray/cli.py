"""The `stroke-ray` command line: one sub-command per pipeline stage.

    stroke-ray synth    make synthetic ISLES'22- or ATLAS-like cases
    stroke-ray convert  NIfTI dataset -> Zarr store
    stroke-ray export-nnunet  Zarr store -> nnU-Net v2 raw dataset
    stroke-ray plan     patch size, batch size and network for a store
    stroke-ray train    one training run on Ray Train
    stroke-ray tune     a sweep with Ray Tune + Optuna, tracked in MLflow
    stroke-ray predict  lesion masks for new cases, in their own space
    stroke-ray serve    HTTP prediction service on Ray Serve
    stroke-ray export   a model as ONNX or TorchScript
    stroke-ray demo     the whole pipeline on a small synthetic dataset

Every command reports a bad input as one line naming the file and the problem and exits
non-zero; module functions raise `StrokeRayError`, `cli_common.user_errors` turns it into
that line. The commands that apply a trained model (predict, serve, export) are written in
cli_model.py and registered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stroke_ray import cli_model
from stroke_ray.cli_common import (
    MAX_DIM_OPTION,
    MAX_IMAGE_GIB_OPTION,
    RESAMPLE_MASKS_OPTION,
    VOXEL_RANGE_OPTION,
    limits,
    user_errors,
)
from stroke_ray.errors import StrokeRayError
from stroke_ray.model_ref import run_model_uri

__all__ = ["app", "train_config"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distributed training, tuning and serving of 3D stroke-lesion segmentation.",
)


@app.command()
@user_errors
def synth(
    output: Path = typer.Option(..., "-o", "--output", help="Dataset folder to create."),
    n: int = typer.Option(8, "-n", "--num-cases", min=1, help="Number of cases."),
    layout: str = typer.Option("isles22", help="isles22 or atlas."),
    seed: int = typer.Option(0, min=0, help="Random seed; the same seed gives the same cases."),
    profile: str = typer.Option(
        "train", help="train, or shifted: held-out cases from settings training never sees "
        "(other scanners, orientations, contrasts, embolic clusters)."),
    artefacts: bool = typer.Option(
        True, "--artefacts/--no-artefacts",
        help="Real-scan DWI artefacts (bright rims, normal ADC) as the profile sets them, or none."),
) -> None:
    """Generate synthetic stroke cases on real MNI152 anatomy."""
    from stroke_ray.synth import generate_dataset, settings_for, without_artefacts

    settings = settings_for(profile) if artefacts else without_artefacts(settings_for(profile))
    subjects = generate_dataset(output, num_cases=n, layout=layout, seed=seed, progress=True, profile=settings)
    typer.echo(f"wrote {len(subjects)} synthetic {layout} case(s) ({profile} profile) to {output}")


@app.command()
@user_errors
def convert(
    dataset: str = typer.Argument(..., help="Dataset root (ISLES'22 archive or rawdata/, ATLAS R2.0, nnU-Net v2 raw)."),
    output: str = typer.Option(..., "-o", "--output", help="Zarr store path or URL."),
    modalities: Optional[str] = typer.Option(
        None, "-m", "--modalities", help="Comma-separated, e.g. dwi,adc,flair (default: all of the layout)."
    ),
    layout: str = typer.Option("auto", help="auto, isles22, atlas or nnunet."),
    levels: str = typer.Option("64,128", help="Cubic whole-field-of-view training levels to write ('' for none)."),
    spacing: str = typer.Option(
        "2", help="Isotropic physical-spacing levels in mm, cropped to the brain, e.g. 2 or 1,2 ('' for none)."
    ),
    normalization: str = typer.Option("zscore", help="zscore (within brain) or none."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for a local Ray."),
    parallel: bool = typer.Option(
        True, "--parallel/--in-process", help="One Ray task per subject, or convert in this process."
    ),
    max_dim: int = MAX_DIM_OPTION,
    max_image_gib: float = MAX_IMAGE_GIB_OPTION,
    voxel_range_mm: str = VOXEL_RANGE_OPTION,
    resample_masks: bool = RESAMPLE_MASKS_OPTION,
) -> None:
    """Convert a NIfTI dataset into a Zarr store (resumable, parallel on Ray).

    Exits 1 when any subject failed (after converting all the others), 2 on a bad request.
    """
    from stroke_ray.grid import spacing_level_name
    from stroke_ray.ingest import convert_dataset
    from stroke_ray.store import StoreSettingsError

    try:
        spacing_levels = [spacing_level_name(float(x)) for x in spacing.split(",") if x.strip()]
    except ValueError as exc:
        raise StrokeRayError(f"--spacing: {exc}") from None
    try:
        report = convert_dataset(
            dataset,
            output,
            modalities=modalities.split(",") if modalities else None,
            layout=layout,
            levels=[x.strip() for x in levels.split(",") if x.strip()] + spacing_levels,
            normalization=normalization,
            address=address,
            num_cpus=num_cpus,
            progress=True,
            parallel=parallel,
            limits=limits(max_dim, max_image_gib, voxel_range_mm),
            resample_masks=resample_masks,
        )
    except StoreSettingsError as exc:
        raise StrokeRayError(
            f"{exc.url}: existing store was made with {exc.describe(exc.have)}, not {exc.describe(exc.wanted)}; "
            f"to add to it, convert with {_convert_flags(exc.have)}; else use another output path"
        ) from None
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(code=1)


def _convert_flags(settings: dict) -> str:
    """The `convert` options that make a store with `settings` (its modalities, levels, normalization)."""
    from stroke_ray.grid import parse_level

    cubes, spacings = [], []
    for level in settings.get("levels") or []:
        spec = parse_level(level)
        if spec.kind == "cube":
            cubes.append(str(spec.value))
        elif spec.kind == "spacing":
            spacings.append(f"{spec.value:g}")
    none = "''"  # an empty list, as the shell passes it
    return (f"-m {','.join(settings.get('modalities') or [])} --levels {','.join(cubes) or none} "
            f"--spacing {','.join(spacings) or none} --normalization {settings.get('normalization')}")


@app.command("export-nnunet")
@user_errors
def export_nnunet(
    store: str = typer.Argument(..., help="stroke-ray Zarr store (path or URL)."),
    output: Path = typer.Argument(..., help="Folder to write (new or empty), e.g. nnUNet_raw/Dataset501_Stroke."),
) -> None:
    """Write a store's subjects as an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json)."""
    from stroke_ray.nnunet_export import export_nnunet as run_export

    typer.echo(run_export(store, output, progress=True).summary())


@app.command()
@user_errors
def plan(
    store: str = typer.Argument(..., help="Zarr store written by `stroke-ray convert`."),
    level: str = typer.Option("2mm", help="Store level to plan for (a spacing level such as 2mm)."),
    memory_gb: Optional[float] = typer.Option(
        None, min=0.05, help="Memory budget of one training step in GiB (default: the GPU's; on a CPU the plan is sized by compute)."
    ),
    base_width: Optional[int] = typer.Option(None, min=1, help="Channels of the first level (default 32 on GPU, 16 on CPU)."),
    config: Path = typer.Option("recipe", "-c", "--config", help="Base training config to complete (default: the shipped recipe)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the planned training config here (YAML)."),
) -> None:
    """Plan patch size, batch size and network for a store, as nnU-Net's planner does."""
    import yaml

    from stroke_ray.config import TrainConfig
    from stroke_ray.files import atomic_write_text
    from stroke_ray.plan import GIB, fingerprint, plan_training

    fp = fingerprint(store, level)
    planned = plan_training(fp, memory_budget=None if memory_gb is None else int(memory_gb * GIB), base_width=base_width)
    typer.echo(
        f"store {fp.store}: {fp.subjects} subjects, level {fp.level}, median shape {fp.median_shape}, "
        f"spacing {fp.spacing} mm, {fp.channels} channel(s) ({', '.join(fp.modalities)}), "
        f"lesion volume median {fp.lesion_ml_median} ml (5th percentile {fp.lesion_ml_p5} ml)"
    )
    typer.echo(
        f"plan ({planned.device}, {planned.basis}): patch {planned.patch_size}, "
        f"batch {planned.batch_size}, widths {planned.widths}, estimated {planned.estimated_gb} GiB a step"
    )
    if output is not None:
        raw = TrainConfig.from_yaml(config).model_dump(mode="json")
        raw["data"]["store"] = store
        updates = planned.config_updates()
        raw["data"].update(updates["data"])
        raw["model"].update(updates["model"])
        raw["batch_size"] = updates["batch_size"]
        cfg = TrainConfig.from_dict(raw, source="plan")
        header = f"# planned by `stroke-ray plan {store} --level {level}`: {planned.as_dict()}\n"
        atomic_write_text(output, header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        typer.echo(f"wrote {output}")


def train_config(config: Path, *, name: str | None = None, store: str | None = None, epochs: int | None = None,
                 augment: str | None = None, tracking_uri: str | None = None, storage: str | None = None):
    """`stroke-ray train`'s config: the YAML with the command line's overrides, validated once.

    Raises:
        ConfigError: the YAML or an override is invalid.
    """
    from stroke_ray.config import TrainConfig

    raw = TrainConfig.from_yaml(config).model_dump(mode="json")
    for key, value in (("name", name), ("epochs", epochs), ("tracking_uri", tracking_uri), ("storage_path", storage)):
        if value is not None:
            raw[key] = value
    if store is not None:
        raw["data"]["store"] = store
    if augment is not None:
        raw["augment"]["preset"] = augment
    return TrainConfig.from_dict(raw, source=str(config))


@app.command()
@user_errors
def train(
    config: Path = typer.Option(..., "-c", "--config", help="Training config YAML, or a shipped one by name (train_example)."),
    name: Optional[str] = typer.Option(None, help="Run name; re-using a name resumes that run."),
    store: Optional[str] = typer.Option(None, help="Zarr store to train on (overrides data.store)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Total epochs (overrides epochs)."),
    augment: Optional[str] = typer.Option(
        None, help="Augmentation preset: none, light or strong (overrides augment.preset; "
        "per-transform settings in the config stay)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: sqlite:///$PWD/mlflow.db)."),
    folds: Optional[int] = typer.Option(
        None, min=2, help="k-fold cross-validation: one run per fold, out-of-fold metrics, the fold ensemble."
    ),
    storage: Optional[str] = typer.Option(
        None, help="Where the run's checkpoints go: a folder or a URL such as s3://bucket/runs (overrides storage_path)."),
) -> None:
    """Train one model on Ray Train, tracked in MLflow; re-run the same name to resume."""
    from stroke_ray.train import run_training

    cfg = train_config(config, name=name, store=store, epochs=epochs, augment=augment,
                       tracking_uri=tracking_uri, storage=storage)
    if folds is not None:
        from stroke_ray.crossval import cross_validate

        typer.echo(cross_validate(cfg, folds, address=address).summary())
        return
    result = run_training(cfg, address=address)
    metrics = result.metrics or {}
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("epoch", "train_loss", "val_dice") if k in metrics)
    typer.echo(f"trained {cfg.name}: {shown}")
    if result.checkpoint is not None:
        typer.echo(f"checkpoint: {result.checkpoint.path}")
    run_id = getattr(result, "mlflow_run_id", "?")
    typer.echo(f"mlflow run: {run_id} (model: {run_model_uri(run_id)})")


@app.command()
@user_errors
def tune(
    space: Path = typer.Option(..., "-s", "--space", help="Search-space YAML, or a shipped space by name: default, seed_replication, smoke."),
    config: Optional[Path] = typer.Option(None, "-c", "--config", help="Base training config YAML (default: built-in defaults)."),
    store: Optional[str] = typer.Option(None, help="Zarr store to train on (overrides data.store)."),
    name: Optional[str] = typer.Option(None, help="Sweep name (default: the space's name)."),
    storage: str = typer.Option(
        "runs", help="Folder or URL (s3://bucket/runs) for sweep state, checkpoints and reports."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep of the same name."),
    num_samples: Optional[int] = typer.Option(None, min=1, help="Trials (overrides the space's num_samples)."),
    seed: int = typer.Option(0, help="Optuna sampler seed."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: sqlite:///$PWD/mlflow.db)."),
    time_budget: Optional[float] = typer.Option(None, min=1, help="Stop after this many seconds (resume later)."),
    promote: bool = typer.Option(
        False, "--promote", help="Make the best trial the champion even if it does not beat the current one.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's trial tables and worker logs (else in <storage>/<name>/sweep.log)."),
    cpus_per_trial: Optional[float] = typer.Option(
        None, help="CPUs one trial's training workers hold in all (fractions allowed; overrides the space)."),
    gpus_per_trial: Optional[float] = typer.Option(
        None, help="GPUs per trial: 0.25 runs four trials on a GPU, 0 trains on CPUs (overrides the space)."),
    retrain_folds: Optional[int] = typer.Option(
        None, min=2, help="Retrain the best configuration on K folds; the fold ensemble becomes the champion.",
    ),
) -> None:
    """Search hyper-parameters with Ray Tune + Optuna + ASHA; the best model becomes the champion when it beats the current one on the same held-out subjects (or with --promote)."""
    from stroke_ray.config import TrainConfig
    from stroke_ray.search_space import SearchSpace, TrialResources
    from stroke_ray.tune import run_sweep

    resources = TrialResources.parse("stroke-ray tune", cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)

    base = TrainConfig.from_yaml(config) if config is not None else TrainConfig()
    if store is not None:
        base = base.model_copy(update={"data": base.data.model_copy(update={"store": store})})
    sweep_name = name or SearchSpace.load(space).name
    result = run_sweep(
        space, base, name=sweep_name, storage_path=storage,
        tracking_uri=tracking_uri, address=address, resume=resume, num_samples=num_samples,
        seed=seed, time_budget_s=time_budget, promote_best=promote, verbose=2 if verbose else 1,
        resources=resources,
        register=retrain_folds is None,
    )
    typer.echo(result.summary())
    if result.best is None:
        raise typer.Exit(code=1)
    if retrain_folds is not None:
        from stroke_ray.crossval import retrain_best

        cv = retrain_best(result, retrain_folds, tracking_uri=tracking_uri, address=address)
        typer.echo(cv.summary())


@app.command()
@user_errors
def demo(
    workdir: Path = typer.Option(Path("demo"), "-w", "--workdir", help="Folder for data, runs, MLflow and predictions."),
    num_cases: int = typer.Option(8, "-n", "--num-cases", min=3, help="Synthetic cases to generate."),
    num_samples: Optional[int] = typer.Option(None, min=1, help="Sweep trials (default: the smoke space's)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for a local Ray."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's trial tables and worker logs (else in the sweep's sweep.log)."),
) -> None:
    """Run the whole pipeline on synthetic data: convert, sweep, register, predict."""
    from stroke_ray.demo import run_demo

    run_demo(workdir, num_cases=num_cases, num_samples=num_samples, address=address, num_cpus=num_cpus, verbose=verbose)


for _command in cli_model.COMMANDS:
    app.command()(_command)


if __name__ == "__main__":  # python -m stroke_ray.cli
    app()