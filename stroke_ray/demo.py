"""The whole pipeline on a small synthetic dataset, end to end, on one machine.

    synthetic ISLES'22 cases -> Zarr store -> smoke sweep (Ray Tune + Optuna, MLflow)
    -> champion model in the registry -> masks for the held-out cases, in their own space

Everything lands under one working folder, and every stage is idempotent: a second run
reuses the dataset and the store, resumes (or simply re-reads) the sweep, and rewrites the
predictions, so an interrupted demo is finished by running it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from stroke_ray.config import TrainConfig
from stroke_ray.datasets import discover
from stroke_ray.errors import InputFileError
from stroke_ray.ingest import convert_dataset
from stroke_ray.model_ref import CHAMPION_URI
from stroke_ray.predict import predict_dataset
from stroke_ray.raycluster import connect
from stroke_ray.resources import search_space_file
from stroke_ray.splits import split_subjects
from stroke_ray.synth import generate_dataset
from stroke_ray.tune import run_sweep

__all__ = ["DEMO_LEVEL", "DemoResult", "SMOKE_SPACE", "run_demo"]

SMOKE_SPACE = search_space_file("smoke")  # shipped with the package: works from a wheel
DEMO_LEVEL = "2mm"  # the recipe's level


@dataclass
class DemoResult:
    workdir: Path
    dataset: Path
    store: Path
    sweep_dir: Path
    tracking_uri: str
    predictions: Path
    metrics: list[dict]  # one row per held-out case
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        db = self.tracking_uri
        lines = [
            f"dataset      {self.dataset}",
            f"store        {self.store}",
            f"sweep        {self.sweep_dir}  (report: {self.sweep_dir / 'report.md'})",
            f"best model   {self.sweep_dir / 'best' / 'checkpoint.pt'}  = {CHAMPION_URI}",
            f"predictions  {self.predictions}",
        ]
        for row in self.metrics:
            truth = row.get("truth_volume_ml")
            lines.append(
                f"  {row['subject']}: dice {float(row.get('dice', 'nan')):.3f}, "
                f"lesion volume {float(row.get('volume_ml', 'nan')):.2f} ml"
                + (f" (truth {float(truth):.2f} ml)" if truth is not None else "")
            )
        lines.append("times        " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        lines.append(f"MLflow UI    mlflow ui --backend-store-uri {db}")
        return "\n".join(lines)


def _dataset_complete(root: Path, num_cases: int) -> bool:
    if not root.is_dir():
        return False
    try:
        cases, problems = discover(root, layout="isles22")
    except InputFileError:  # an empty or half-made folder: no ISLES'22 layout yet
        return False
    return len(cases) >= num_cases and not problems


def run_demo(
    workdir: str | Path = "demo",
    num_cases: int = 8,
    num_samples: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = False,
) -> DemoResult:
    """Run (or finish) the demo in `workdir`; returns where everything is.

    `progress` shows one progress line per stage; `verbose` shows Ray's own trial tables and
    worker logs instead of the sweep's progress line (they are in the sweep's `sweep.log`
    otherwise).
    """
    def say(msg: str) -> None:
        if progress:
            print(f"[demo] {msg}", flush=True)

    work = Path(workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    dataset, store = work / "data" / "isles_synth", work / "data" / "synth.zarr"
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    if _dataset_complete(dataset, num_cases):
        say(f"dataset: reusing {dataset}")
    else:
        say(f"dataset: generating {num_cases} synthetic ISLES'22 cases in {dataset}")
        generate_dataset(dataset, num_cases=num_cases, layout="isles22", seed=seed, progress=progress)
    seconds["dataset"] = time.perf_counter() - t

    t = time.perf_counter()
    connect(address, num_cpus=num_cpus)
    say(f"store: converting to {store} (completed subjects are skipped)")
    report = convert_dataset(str(dataset), str(store), levels=[DEMO_LEVEL], progress=progress)
    say(report.summary())
    seconds["convert"] = time.perf_counter() - t

    t = time.perf_counter()
    # The shipped recipe (configs/recipe.yaml) at the smoke space's scale: its networks and
    # patches, 4 epochs of 60 steps, and light augmentation, which 240 steps can learn through.
    recipe = TrainConfig.from_yaml("recipe").model_dump(mode="json", exclude_unset=True)
    base = TrainConfig.from_dict({
        **recipe,
        "name": "demo",
        "data": {**recipe["data"], "store": str(store), "level": DEMO_LEVEL},
        "augment": "light",
        "steps_per_epoch": 60,
        "batch_size": 2,
        "storage_path": str(work / "runs"),
        "tracking_uri": tracking_uri,
        "experiment": "stroke-ray-demo",
        "seed": seed,
    }, source="demo config")
    say(f"sweep: {SMOKE_SPACE.name} on Ray Tune, tracked in {tracking_uri}")
    sweep = run_sweep(
        SMOKE_SPACE, base, name="demo-smoke", storage_path=str(work / "runs"), tracking_uri=tracking_uri,
        address=address, resume=True, num_samples=num_samples, seed=seed,
        verbose=2 if verbose else (1 if progress else 0),
    )
    say(sweep.summary())
    seconds["sweep"] = time.perf_counter() - t
    if sweep.best_checkpoint is None:
        raise RuntimeError(f"{sweep.path}: no trial finished; see {sweep.report_path}")

    # The held-out cases are the validation split the training used (same subjects, seed).
    t = time.perf_counter()
    cfg = sweep.best_config
    cases, _ = discover(dataset, layout="isles22")
    _, val = split_subjects(sorted(c.subject for c in cases), cfg.data.val_fraction, cfg.data.split_seed)
    out = work / "predictions"
    rep = predict_dataset(dataset, model_ref=str(sweep.best_checkpoint), output_dir=out,
                          tracking_uri=tracking_uri, subjects=val, progress=progress,
                          overwrite=True)  # the demo's own folder: a re-run refreshes it
    rows: list[dict] = list(rep.rows)
    for problem in rep.failed:
        say(f"prediction failed: {problem}")
    seconds["predict"] = time.perf_counter() - t

    result = DemoResult(
        workdir=work, dataset=dataset, store=store, sweep_dir=sweep.path, tracking_uri=tracking_uri,
        predictions=out, metrics=rows, seconds=seconds,
    )
    say("done\n" + result.summary())
    return result
