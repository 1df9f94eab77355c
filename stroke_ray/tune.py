"""Hyper-parameter sweeps: Ray Tune runs the trials, Optuna picks them, MLflow records them.

A sweep is described by a search-space YAML file (`search_space.SearchSpace`, see
docs/tuning.md). Each Tune trial runs a small driver function that turns the sampled
parameters into a `TrainConfig` and runs one Ray Train job (`train.build_trainer`); Train's
per-epoch reports reach Tune through `TuneReportCallback`, so Optuna (TPE, define-by-run for
conditional parameters) and ASHA (early stopping) see every epoch.

On disk, everything of a sweep lives under `<storage>/<name>/`: Tune's own state (what makes
`resume=True` work), `train/` (one Ray Train run per trial), `best/` (the winning checkpoint
and config) and `report.md` (`sweep_report`). `<storage>` is a local or shared folder or an
object-store URL (`s3://bucket/runs`): Ray writes its part through pyarrow filesystems, and
stroke-ray writes `best/` and the report through the same ones (`locations.write_bytes`). In MLflow there is one parent run per sweep
and one nested run per trial (`tracking.sweep_parent_run`, `tracking.trial_run`), both
found again by tags on resume so nothing is logged twice.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from ray import tune
from ray.train import Checkpoint
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from stroke_ray import ray_compat, tracking
from stroke_ray.config import TrainConfig
from stroke_ray.console import SweepProgress, ray_output_to
from stroke_ray.errors import StrokeRayError
from stroke_ray.evaluate import evaluate_checkpoint
from stroke_ray.files import CHECKPOINT_FILE
from stroke_ray.locations import absolute, is_url, join, make_folder, write_bytes, write_text
from stroke_ray.promotion import HeldOutScore, Promotion, promote
from stroke_ray.raycluster import connect
from stroke_ray.resources import search_space_file
from stroke_ray.search_space import SearchSpace, TrialResources
from stroke_ray.splits import validation_subjects
from stroke_ray.store import StrokeStore
from stroke_ray.sweep_figures import log_sweep_figures
from stroke_ray.sweep_report import TrialSummary, param_importances, summarise, write_report
from stroke_ray.train import check_store
from stroke_ray.tune_trial import DRIVER_CPU, TrialCleanup, TrialDriver, trial_concurrency

__all__ = ["SWEEP_LOG", "SweepResult", "run_sweep"]

# Ray's trial tables and worker logs of a sweep, unless --verbose shows them on the console.
SWEEP_LOG = "sweep.log"
# --------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """What a sweep produced, and where."""

    name: str
    path: Path | str  # <storage>/<name>: a Path for local storage, a URL string otherwise
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config: TrainConfig | None
    best_checkpoint: Path | str | None  # <storage>/<name>/best/checkpoint.pt
    parent_run_id: str
    model_version: str | None  # the best trial's registry version (champion or not)
    importances: dict[str, float]
    report_path: Path | str
    seconds: float
    promotion: Promotion | None = None
    log_path: Path | str | None = None  # <storage>/<name>/sweep.log

    def summary(self) -> str:
        lines = [f"sweep {self.name}: {len(self.trials)} trials in {self.seconds:.0f} s -> {self.path}"]
        if self.best is not None:
            lines.append(f"best trial {self.best.trial_id}: {self.metric} = {self.best.metric:.4f}")
            lines.append(f"best checkpoint: {self.best_checkpoint}")
        if self.promotion is not None:
            lines.append(self.promotion.line())
        lines.append(f"report: {self.report_path}")
        if self.log_path is not None:
            lines.append(f"Ray's log: {self.log_path}")
        return "\n".join(lines)


def _promote(client, run_id: str, checkpoint: Path, config: TrainConfig, score: float, space: SearchSpace,
             force: bool) -> Promotion:
    """Register the best trial with what its score was measured on, and promote it if it wins."""
    store = config.data.store
    subjects = validation_subjects(StrokeStore.open(store).subjects(), config.data.val_fraction,
                                   config.data.split_seed, config.val_max_subjects)
    held_out = HeldOutScore(space.metric, space.mode, float(score), tuple(subjects), store)

    def evaluate(champion: Path, on: HeldOutScore) -> float:
        return evaluate_checkpoint(champion, on.store, on.subjects, on.metric)

    return promote(client, run_id, checkpoint, held_out, force=force, evaluate=evaluate)


def _as_location(location: str) -> Path | str:
    """A Path for a local location (what callers of a local sweep get), a URL string otherwise."""
    return location if is_url(location) else Path(location)


def _export_checkpoint(src: str, dest_dir: str, local_dir: Path) -> Path:
    """Copy the winning Train checkpoint's checkpoint.pt to <sweep>/best/ (whole or not at all)
    and to `local_dir`; returns the local copy (for MLflow)."""
    with Checkpoint(path=src).as_directory() as local:
        source = Path(local) / CHECKPOINT_FILE
        if not source.exists():
            raise StrokeRayError(f"{src}: checkpoint directory has no {CHECKPOINT_FILE}")
        data = source.read_bytes()
    write_bytes(join(dest_dir, CHECKPOINT_FILE), data)
    copy = local_dir / CHECKPOINT_FILE
    copy.write_bytes(data)
    return copy


def _best_trial(space: SearchSpace, trials: list[TrialSummary]) -> TrialSummary | None:
    """The trial with the best metric and a checkpoint (ties: the lowest trial id)."""
    # Sorted by trial id so ties (common in tiny sweeps) pick the same trial every time.
    scored = sorted((t for t in trials if t.metric is not None and t.checkpoint), key=lambda t: t.trial_id)
    if not scored:
        return None
    return (max if space.mode == "max" else min)(scored, key=lambda t: t.metric)


# --------------------------------------------------------------------------- the sweep


def _new_tuner(trainable, space: SearchSpace, probe: TrainConfig, name: str, storage: str, *,
               num_samples: int, seed: int, max_concurrent: int | None, time_budget_s: float | None,
               stopper, verbose: int, callbacks: list):
    # `verbose` is Tune's own level: its tables go to the console or to the sweep log.
    """A fresh Tuner: Optuna's TPE behind a concurrency limit, ASHA on the space's metric."""
    searcher = OptunaSearch(
        space=space, metric=space.metric, mode=space.mode, sampler=optuna.samplers.TPESampler(seed=seed),
    )
    scheduler = ASHAScheduler(
        metric=space.metric,
        mode=space.mode,
        time_attr="training_iteration",
        # One past the last epoch: a trial that runs all its epochs ends by itself, so
        # its Train run shuts down cleanly; only early stops cut a trial short.
        max_t=probe.epochs + 1,
        grace_period=min(space.grace_period, probe.epochs),
        reduction_factor=space.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent or trial_concurrency(probe)),
            scheduler=scheduler,
            num_samples=num_samples,
            time_budget_s=time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, stop=stopper, verbose=verbose,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def run_sweep(
    space_file: str | Path,
    base_config: TrainConfig,
    name: str,
    storage_path: str,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
    *,
    max_concurrent: int | None = None,
    time_budget_s: float | None = None,
    stopper=None,
    register: bool = True,
    promote_best: bool = False,
    verbose: int = 1,
    resources: TrialResources | None = None,
) -> SweepResult:
    """Run (or resume) a sweep and export, register and report its best trial.

    The best trial is registered with its held-out score and validation subjects, and
    becomes the champion only when it beats the current one on those subjects
    (`promotion.promote`), or always with `promote_best`.

    `resume=True` continues `<storage_path>/<name>` when Tune left state there (finished
    trials are kept, unfinished and errored ones run again) and starts afresh otherwise.
    `time_budget_s` / `stopper` end a sweep early; it can then be resumed. `storage_path`
    may be a URL (`s3://bucket/runs`). `resources` (CPUs/GPUs per trial) override the
    space file's.

    `verbose`: 0 prints nothing, 1 one progress line (`console.SweepProgress`), 2 Ray's own
    trial tables and worker logs on the console. At 0 and 1 those go to
    `<storage_path>/<name>/sweep.log` (`SWEEP_LOG`).

    Raises:
        ConfigError: the search space or the base config is not usable.
        StrokeRayError: the store cannot be trained on, or a sweep of that name exists.
    """
    started = time.time()
    space_file = search_space_file(space_file)
    space = SearchSpace.load(space_file)
    if resources is not None:
        space = dataclasses.replace(space, resources=space.resources.merged(resources))
    storage = absolute(storage_path)
    sweep_dir = join(storage, name)
    tracking_uri = tracking_uri or base_config.tracking_uri or tracking.default_tracking_uri()
    # Tune runs each trial in its own working directory: make a local store path absolute.
    base_config = base_config.model_copy(deep=True)
    base_config.data.store = absolute(base_config.data.store)
    # The trials' configs and the store must validate before any compute is spent on them.
    probe = space.trial_config(base_config, {})
    check_store(probe.data.store, sorted(space.levels(base_config)))
    make_folder(storage)
    total = num_samples or space.num_samples

    connect(address)
    restoring = resume and tune.Tuner.can_restore(sweep_dir)
    if not restoring and tune.Tuner.can_restore(sweep_dir):
        raise StrokeRayError(f"{sweep_dir}: a sweep named {name!r} already exists there; resume it or pick another name")

    client = tracking.client_for(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, base_config.experiment)
    parent_id = tracking.sweep_parent_run(client, experiment_id, sweep_dir, name, reuse=restoring)
    if not restoring:  # a resumed sweep keeps its original settings (and params)
        tracking.log_sweep_settings(client, parent_id, {
            "space": space.name, "space_file": str(space_file), "metric": space.metric, "mode": space.mode,
            "num_samples": total, "seed": seed, "fixed": dict(space.fixed),
        }, space_file)

    driver = TrialDriver(space, base_config.model_dump(), sweep_dir, tracking_uri, base_config.experiment, parent_id)
    trainable = tune.with_resources(driver, {"CPU": DRIVER_CPU})
    callbacks = [TrialCleanup(tracking_uri, base_config.experiment, parent_id)]
    if verbose == 1:
        callbacks.append(SweepProgress(name, total, space.metric, space.mode))
    ray_compat.release_orphaned_train_groups({"CPU": DRIVER_CPU})  # left by an interrupted session
    if restoring:
        ray_compat.reopen_search(sweep_dir, total)
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True, restart_errored=False)
        ray_compat.set_stop_conditions(tuner, stopper, time_budget_s, callbacks)
    else:
        tuner = _new_tuner(trainable, space, probe, name, storage, num_samples=total, seed=seed,
                           max_concurrent=max_concurrent, time_budget_s=time_budget_s, stopper=stopper,
                           verbose=1, callbacks=callbacks)
    # Ray's output goes to a local file; beside an object-store sweep it is uploaded afterwards.
    log = join(sweep_dir, SWEEP_LOG)
    local_log = Path(tempfile.gettempdir()) / f"stroke-ray-{name}-{SWEEP_LOG}" if is_url(log) else Path(log)
    with ray_output_to(None if verbose >= 2 else local_log):
        grid = tuner.fit()
    if is_url(log) and local_log.is_file():
        write_bytes(log, local_log.read_bytes())

    trials = [summarise(r, space, storage) for r in grid]
    best = _best_trial(space, trials)
    best_config = space.trial_config(base_config, best.params) if best else None
    best_checkpoint = None
    model_version = None
    promotion = None
    if best is not None:
        best_dir = join(sweep_dir, "best")
        with tempfile.TemporaryDirectory() as tmp:
            local_best = _export_checkpoint(best.checkpoint, best_dir, Path(tmp))
            write_text(join(best_dir, "config.yaml"), yaml.safe_dump(best_config.model_dump(), sort_keys=False))
            best_checkpoint = _as_location(join(best_dir, CHECKPOINT_FILE))
            best_run = tracking.find_run_by_tags(
                client, experiment_id, {tracking.PARENT_TAG: parent_id, tracking.TAG_TRIAL: best.trial_id})
            tracking.log_best_trial(client, parent_id, best.trial_id, space.metric, best.metric,
                                    best_run.info.run_id if best_run is not None else None)
            if best_run is not None and register:
                promotion = _promote(client, best_run.info.run_id, local_best, best_config, best.metric,
                                     space, force=promote_best)
                model_version = promotion.version

    importances = param_importances(space, trials)
    report_path = join(sweep_dir, "report.md")
    text = write_report(report_path, space, trials, best, best_config, importances)
    tracking.log_sweep_report(client, parent_id, text, importances)
    log_sweep_figures(client, parent_id, space, trials, importances)
    # Unfinished trials (a time budget or stopper hit) leave the parent open for a resume.
    ran = [t for t in trials if t.status != "NOT RUN"]
    if len(ran) >= total and not any(t.status == "ERROR" for t in trials):
        tracking.close_sweep_run(client, parent_id)
    if verbose >= 2:
        print(text)
    return SweepResult(
        name=name, path=_as_location(sweep_dir), metric=space.metric, mode=space.mode, trials=trials, best=best,
        best_config=best_config, best_checkpoint=best_checkpoint, parent_run_id=parent_id,
        model_version=model_version, importances=importances, report_path=_as_location(report_path),
        promotion=promotion, log_path=None if verbose >= 2 else _as_location(log),
        seconds=time.time() - started,
    )
