"""k-fold cross-validation on Ray Train: one run per fold, out-of-fold scores, the ensemble.

`cross_validate(cfg, k)` is `stroke-ray train --folds k` (and the retraining step of
`stroke-ray tune --retrain-folds k`):

1. The store's subjects are dealt into k folds (`splits.fold_splits`, seeded by
   `data.split_seed`). Fold i trains `cfg` with `data.fold = i`: it validates on fold i and
   trains on the others.
2. Every fold is one Ray Train run (`train.build_trainer`, run name `<name>-fold<i>` under
   `storage_path`, so re-running the same command resumes unfinished folds). The runs are
   started from small driver tasks (a sliver of a CPU each, as Tune's trial drivers) as
   many at a time as the cluster's free CPUs (or GPUs) hold one fold's workers.
3. In MLflow, a parent run `<name>` (kind `cv`, nested under `parent_run_id` when given)
   holds one nested run per fold (kind `fold`), into which the fold's workers log as any
   training run.
4. Out of fold: as each fold finishes, its final model predicts its own validation subjects
   in their own space (`validation.predict_subject`, the path `predict` takes), so every
   subject is predicted once, by the model that did not train on it. The parent gets the
   means (`oof_dice`, `oof_lesion_f1`, ..., `oof_level_*` when the level is not native) and
   `oof.csv` with one row per subject.
5. The fold models become one ensemble checkpoint (`checkpoint.save_ensemble`:
   probabilities averaged) whose postprocessing (minimum lesion size) is chosen on the
   out-of-fold predictions, as nnU-Net chooses its postprocessing on cross-validation
   results. It is written to `<storage_path>/<name>/ensemble/checkpoint.pt`, logged as the
   parent run's `model/checkpoint.pt`, and registered as the champion when asked.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from stroke_ray import model_ref, tracking
from stroke_ray.checkpoint import load_checkpoint, save_ensemble
from stroke_ray.config import TrainConfig
from stroke_ray.errors import ConfigError, StrokeRayError
from stroke_ray.locations import absolute, is_url, make_folder
from stroke_ray.models import size_multiple
from stroke_ray.raycluster import connect
from stroke_ray.splits import fold_splits
from stroke_ray.store import StrokeStore
from stroke_ray.tracking import KIND_TAG
from stroke_ray.train import build_trainer, check_inputs
from stroke_ray.tune_trial import DRIVER_CPU, trial_concurrency
from stroke_ray.validation import ValidationTotals, predict_subject, score_subject

__all__ = ["CrossValidation", "FoldResult", "cross_validate", "fold_config", "retrain_best"]

FOLD_TAG = "stroke_ray.fold"


def fold_config(cfg: TrainConfig, fold: int, k: int) -> TrainConfig:
    """`cfg` for fold `fold` of `k`: validates on that fold, runs under `<name>-fold<fold>`."""
    data = cfg.data.model_copy(update={"fold": int(fold), "num_folds": int(k)})
    return TrainConfig.from_dict(
        {**cfg.model_dump(mode="json"), "name": f"{cfg.name}-fold{fold}", "data": data.model_dump(mode="json")}
    )


@dataclass
class FoldResult:
    """One fold: its subjects, MLflow run, last reported metrics and checkpoint file."""

    fold: int
    val_subjects: list[str]
    run_id: str
    metrics: dict[str, Any]
    checkpoint: Path  # the fold's final checkpoint.pt, copied beside the ensemble


@dataclass
class CrossValidation:
    """What `cross_validate` did."""

    name: str
    folds: list[FoldResult]
    oof_metrics: dict[str, float]
    rows: list[dict[str, Any]]  # one per subject: its fold and native (and level) metrics
    ensemble: Path  # the ensemble's checkpoint.pt
    parent_run_id: str
    model_uri: str  # runs:/<parent>/model
    model_version: str | None = None  # registry version when registered
    postprocessing: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        shown = ", ".join(f"{k}={self.oof_metrics[f'oof_{k}']:.4f}" for k in ("dice", "lesion_f1"))
        lines = [f"cross-validation {self.name}: {len(self.folds)} folds, {len(self.rows)} subjects out of fold: {shown}"]
        for f in self.folds:
            lines.append(f"  fold {f.fold}: {len(f.val_subjects)} validation subjects, "
                         f"val_dice={f.metrics.get('val_dice', float('nan')):.4f} (mlflow run {f.run_id})")
        lines.append(f"ensemble of {len(self.folds)}: {self.ensemble} "
                     f"(min lesion {self.postprocessing.get('min_lesion_ml', 0.0):g} ml)")
        lines.append(f"model: {self.model_uri}" + (f", registered as version {self.model_version}"
                                                    if self.model_version else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------- Ray tasks


def _fit_fold(cfg_json: dict, storage_path: str, run_id: str, tracking_uri: str):
    """Ray task: train one fold; returns (last metrics, the final ray.train.Checkpoint)."""
    cfg = TrainConfig.from_dict(cfg_json)
    result = build_trainer(cfg, storage_path=storage_path, mlflow_run_id=run_id, tracking_uri=tracking_uri).fit()
    if result.checkpoint is None:
        raise StrokeRayError(f"fold run {cfg.name} reported no checkpoint")
    return dict(result.metrics or {}), result.checkpoint


def _score_fold(checkpoint, store_url: str, subjects: list[str], fold: int, device: str):
    """Ray task: the fold's final model on its validation subjects, in their own space.

    Returns (rows, ValidationTotals.vector()).
    """
    with checkpoint.as_directory() as d:
        loaded = load_checkpoint(d, device=device)
    cfg = loaded.config
    store = StrokeStore.open(store_url)
    totals, rows = ValidationTotals(), []
    for subject in subjects:
        case, prediction = predict_subject(
            loaded.model, store, subject, cfg, device=device, multiple=size_multiple(cfg.model),
            tta_axes=cfg.val_tta_axes,
        )
        scores = score_subject(store, subject, case, prediction, cfg.data.level)
        totals.add(scores)
        row = {"subject": subject, "fold": fold, **scores.native}
        if scores.level is not None:
            row.update({f"level_{k}": v for k, v in scores.level.items()})
        rows.append(row)
    return rows, totals.vector()


# --------------------------------------------------------------------------- driver


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _parent_run(client, cfg: TrainConfig, parent_run_id: str | None, k: int) -> str:
    existing = tracking.find_run(client, cfg.experiment, cfg.name, parent_run_id)
    if existing is not None and client.get_run(existing).data.tags.get(KIND_TAG) != "cv":
        raise ConfigError(f"name: MLflow run {cfg.name!r} exists and is not a cross-validation; use another --name")
    run_id = tracking.get_or_create_run(client, cfg.experiment, cfg.name, parent_run_id=parent_run_id,
                                        tags={KIND_TAG: "cv", "stroke_ray.folds": k})
    if not client.get_run(run_id).data.params:
        tracking.log_params_flat(client, run_id, {**cfg.model_dump(mode="json"), "cv": {"folds": k}})
    return run_id


def cross_validate(
    cfg: TrainConfig,
    k: int,
    *,
    address: str | None = None,
    parent_run_id: str | None = None,
    register: bool = False,
) -> CrossValidation:
    """Train `cfg` on `k` folds, score out of fold, and build the ensemble (module docstring).

    Args:
        cfg: the configuration every fold trains (its `data.fold` is set per fold).
        k: number of folds, 2 <= k <= the number of subjects.
        address: Ray cluster address (None = local Ray).
        parent_run_id: MLflow run to nest the cross-validation's parent run under.
        register: point the registered model's champion alias at the ensemble.

    Raises:
        ConfigError, StrokeRayError: a config or store training cannot use, or failed folds
            (after every other fold has finished).
    """
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"store": absolute(cfg.data.store)})})
    check_inputs(cfg)
    subjects = StrokeStore.open(cfg.data.store).subjects()
    try:
        folds = fold_splits(subjects, int(k), cfg.data.split_seed)
    except ValueError as exc:
        raise ConfigError(f"--folds: {exc}") from None
    make_folder(cfg.storage_path)
    connect(address)
    uri = cfg.tracking_uri or tracking.default_tracking_uri()
    client = tracking.client_for(uri)
    parent = _parent_run(client, cfg, parent_run_id, k)
    storage = absolute(cfg.storage_path)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    fit = ray.remote(_fit_fold).options(num_cpus=DRIVER_CPU, max_retries=0)
    # Scoring a fold takes what one of its training workers held.
    score = ray.remote(_score_fold).options(num_cpus=cfg.cpus_per_worker,
                                            num_gpus=cfg.gpus_per_worker if use_gpu else 0, max_retries=0)
    limit = trial_concurrency(cfg)

    fold_cfgs = [fold_config(cfg, i, k) for i in range(k)]
    run_ids = [
        tracking.get_or_create_run(client, cfg.experiment, c.name, parent_run_id=parent,
                                   tags={KIND_TAG: "fold", FOLD_TAG: i})
        for i, c in enumerate(fold_cfgs)
    ]
    queue, training, scoring = list(range(k)), {}, {}
    fitted: dict[int, tuple[dict, Any]] = {}  # fold -> (last metrics, ray.train.Checkpoint)
    scored: dict[int, tuple[list, list]] = {}  # fold -> (rows, ValidationTotals vector)
    errors: dict[int, str] = {}
    try:
        while queue or training or scoring:
            while queue and len(training) < limit:
                i = queue.pop(0)
                training[fit.remote(fold_cfgs[i].model_dump(mode="json"), storage, run_ids[i], uri)] = i
            done, _ = ray.wait([*training, *scoring], num_returns=1)
            for ref in done:
                if ref in training:
                    i = training.pop(ref)
                    try:
                        fitted[i] = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        errors[i] = str(exc).strip().splitlines()[-1]
                        client.set_terminated(run_ids[i], "FAILED")
                        continue
                    client.set_terminated(run_ids[i], "FINISHED")
                    scoring[score.remote(fitted[i][1], cfg.data.store, folds[i], i, "cuda" if use_gpu else "cpu")] = i
                else:
                    i = scoring.pop(ref)
                    try:
                        scored[i] = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        errors[i] = str(exc).strip().splitlines()[-1]
    except BaseException:
        for ref in [*training, *scoring]:
            ray.cancel(ref, force=True)
        client.set_terminated(parent, "FAILED")
        raise
    if errors:
        client.set_terminated(parent, "FAILED")
        raise StrokeRayError("; ".join(f"fold {i} failed: {e}" for i, e in sorted(errors.items())))

    rows = [row for i in range(k) for row in scored[i][0]]
    totals = ValidationTotals.from_vector([sum(v) for v in zip(*(scored[i][1] for i in range(k)))])
    oof = {f"oof_{key[len('val_'):]}": value for key, value in totals.metrics().items() if key.startswith("val_")}
    post = totals.postprocessing()
    oof["postprocess_min_lesion_ml"] = post.min_lesion_ml
    oof["postprocess_threshold"] = post.threshold

    # The ensemble, with copies of the fold checkpoints beside it (Train may prune its own).
    out_dir = Path(storage) / cfg.name if not is_url(storage) else Path(tempfile.mkdtemp(prefix="stroke-ray-cv-"))
    results = []
    for i in range(k):
        metrics, checkpoint = fitted[i]
        with checkpoint.as_directory() as d:
            copy = out_dir / f"fold{i}" / "checkpoint.pt"
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes((Path(d) / "checkpoint.pt").read_bytes())
        results.append(FoldResult(i, folds[i], run_ids[i], metrics, copy))
    ensemble = save_ensemble(out_dir / "ensemble", [r.checkpoint for r in results], metrics=oof, postprocessing=post)

    tracking.log_metrics(client, parent, oof, step=0)
    client.log_text(parent, _csv(rows), "oof.csv")
    client.log_text(parent, json.dumps({f"fold{i}": f for i, f in enumerate(folds)}, indent=2), "folds.json")
    model_uri = model_ref.log_model(client, parent, ensemble)
    version = model_ref.register_champion(model_uri, client=client, tags={"stroke_ray.folds": k}) if register else None
    client.set_terminated(parent, "FINISHED")
    return CrossValidation(
        name=cfg.name, folds=results, oof_metrics=oof, rows=rows, ensemble=ensemble, parent_run_id=parent,
        model_uri=model_uri, model_version=version, postprocessing=post.to_dict(),
    )


def retrain_best(sweep, k: int, *, tracking_uri: str | None = None, address: str | None = None) -> CrossValidation:
    """A sweep's best configuration retrained on `k` folds; the ensemble becomes the champion.

    The cross-validation runs as `<sweep>-cv<k>` under `<sweep folder>/cv/`, its MLflow
    parent run nested under the sweep's run.

    Args:
        sweep: a `tune.SweepResult` with a best trial.
        k: number of folds.

    Raises:
        StrokeRayError: the sweep has no best configuration, or a fold failed.
    """
    if sweep.best_config is None:
        raise StrokeRayError(f"sweep {sweep.name} has no finished trial to retrain")
    cfg = sweep.best_config.model_copy(update={
        "name": f"{sweep.name}-cv{k}",
        "storage_path": str(Path(sweep.path) / "cv"),
        "tracking_uri": tracking_uri or sweep.best_config.tracking_uri,
    })
    return cross_validate(cfg, k, address=address, parent_run_id=sweep.parent_run_id, register=True)
