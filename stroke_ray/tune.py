"""Hyper-parameter sweeps: Ray Tune runs the trials, Optuna picks them, MLflow records them.

A sweep is described by a search-space YAML file (see `SearchSpace` and docs/tuning.md).
Each Tune trial runs a small driver function that turns the sampled parameters into a
`TrainConfig` and runs one Ray Train job (`train.build_trainer`); Train's per-epoch reports
reach Tune through `TuneReportCallback`, so Optuna (TPE, define-by-run for conditional
parameters) and ASHA (early stopping) see every epoch.

On disk, everything of a sweep lives under `<storage>/<name>/`: Tune's own state (what makes
`resume=True` work), `train/` (one Ray Train run per trial), `best/` (the winning checkpoint
and config) and `report.md`. In MLflow there is one parent run per sweep and one nested run
per trial, both found again by tags on resume so nothing is logged twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from stroke_ray.config import TrainConfig, flatten, read_yaml
from stroke_ray.errors import ConfigError, StrokeRayError
from stroke_ray.files import atomic_path, atomic_write_text
from stroke_ray.locations import absolute, exists, is_url
from stroke_ray.tracking import PARENT_TAG

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "intlog")
SPACE_KEYS = {
    "name", "description", "metric", "mode", "num_samples", "max_epochs", "grace_period",
    "reduction_factor", "fixed", "parameters",
}
# Tags that make MLflow runs findable again when a sweep resumes.
TAG_SWEEP = "stroke_ray.sweep_dir"
# The trial driver only builds a TorchTrainer and waits: a sliver of a CPU, so it never
# competes with its own Train worker for a core.
DRIVER_CPU = 0.01
TAG_TRIAL = "stroke_ray.trial_id"


# --------------------------------------------------------------------------- search space


def _leaf_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable TrainConfig field as a dotted path (model.widths, optim.lr, ...)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaf_fields(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


def _set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _primitive(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


@dataclass
class Parameter:
    """One searched TrainConfig field: a distribution and an optional `when` condition."""

    name: str
    kind: str  # one of DISTRIBUTIONS
    values: list  # the choices, or [low, high]
    when: dict[str, list] = field(default_factory=dict)
    # choice value -> other fields it sets, e.g. unet3d -> {data.level: "64"}
    implies: dict[Any, dict[str, Any]] = field(default_factory=dict)

    @property
    def encoded(self) -> bool:
        # Optuna's categorical choices must be scalars; lists (model.widths) go through JSON.
        return self.kind == "choice" and not all(_primitive(v) for v in self.values)

    def labels(self) -> list:
        return [json.dumps(v) for v in self.values] if self.encoded else list(self.values)

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial (or Tune's capturing proxy of one) for a value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.labels())
        low, high = self.values
        if self.kind == "uniform":
            return trial.suggest_float(self.name, low, high)
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, low, high, log=True)
        return trial.suggest_int(self.name, int(low), int(high), log=self.kind == "intlog")

    def distribution(self):
        """The matching `optuna.distributions` object (to rebuild a study from results)."""
        from optuna import distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution(self.labels())
        low, high = self.values
        if self.kind in ("uniform", "loguniform"):
            return d.FloatDistribution(low, high, log=self.kind == "loguniform")
        return d.IntDistribution(int(low), int(high), log=self.kind == "intlog")


@dataclass
class SearchSpace:
    """A validated search-space file. Calling it on an Optuna trial samples one config.

    Parameters are sampled in file order, so a `when` condition may only refer to a
    parameter declared above it; an inactive parameter keeps the base config's value.
    """

    name: str
    parameters: list[Parameter]
    metric: str = "val_dice"
    mode: str = "max"
    num_samples: int = 20
    max_epochs: int | None = None
    grace_period: int = 1
    reduction_factor: int = 3
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = "search space"

    # -- loading and validation -----------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        """Read and validate a YAML search space; errors name the file and the parameter."""
        path = Path(path)
        return cls.from_dict(read_yaml(path, "search-space file"), source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "search space") -> "SearchSpace":
        def fail(problem: str) -> ConfigError:
            return ConfigError(f"{source}: {problem}")

        if not isinstance(raw, dict):
            raise fail("expected a mapping with 'parameters' at the top level")
        unknown = sorted(set(raw) - SPACE_KEYS)
        if unknown:
            raise fail(f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(SPACE_KEYS))})")
        if raw.get("mode", "max") not in ("max", "min"):
            raise fail(f"mode: must be 'max' or 'min', not {raw.get('mode')!r}")
        if not isinstance(raw.get("metric", "val_dice"), str):
            raise fail("metric: must be a metric name such as val_dice")
        for key, lowest in (("num_samples", 1), ("max_epochs", 1), ("grace_period", 1), ("reduction_factor", 2)):
            value = raw.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < lowest):
                raise fail(f"{key}: must be an integer >= {lowest}, not {value!r}")

        fields = _leaf_fields()
        fixed = raw.get("fixed") or {}
        if not isinstance(fixed, dict):
            raise fail("fixed: must be a mapping of config field -> value")
        for key, value in fixed.items():
            if key not in fields:
                raise fail(f"fixed: {key}: unknown parameter (not a TrainConfig field; e.g. {_examples()})")
            _check_value(source, f"fixed: {key}", key, value)

        params_raw = raw.get("parameters")
        if not isinstance(params_raw, dict) or not params_raw:
            raise fail("parameters: must be a non-empty mapping of config field -> distribution")
        params: list[Parameter] = []
        for name, spec in params_raw.items():
            params.append(_parse_parameter(source, name, spec, fields, params, fixed, list(params_raw)))

        return cls(
            name=str(raw.get("name") or Path(source).stem),
            parameters=params,
            metric=raw.get("metric", "val_dice"),
            mode=raw.get("mode", "max"),
            num_samples=raw.get("num_samples", 20),
            max_epochs=raw.get("max_epochs"),
            grace_period=raw.get("grace_period", 1),
            reduction_factor=raw.get("reduction_factor", 3),
            fixed=dict(fixed),
            description=str(raw.get("description", "")),
            source=source,
        )

    # -- sampling ---------------------------------------------------------------------

    def __call__(self, trial) -> None:
        """Optuna define-by-run function: suggest every active parameter, in order."""
        self.sample(trial)

    def sample(self, trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for p in self.parameters:
            if self._active(p, chosen):
                chosen[p.name] = p.decode(p.suggest(trial))
        return chosen

    def _active(self, p: Parameter, chosen: dict[str, Any]) -> bool:
        return all(ref in chosen and chosen[ref] in allowed for ref, allowed in p.when.items())

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Sampled values as Tune hands them over -> config values (lists un-JSONed)."""
        by_name = {p.name: p for p in self.parameters}
        return {k: by_name[k].decode(v) if k in by_name else v for k, v in params.items()}

    def trial_config(self, base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
        """base config + fixed values + max_epochs + one trial's sampled values."""
        tree = base.model_dump()
        for key, value in self.fixed.items():
            _set_path(tree, key, value)
        if self.max_epochs is not None:
            tree["epochs"] = self.max_epochs
        by_name = {p.name: p for p in self.parameters}
        for key, value in self.decode(params).items():
            _set_path(tree, key, value)
            implied = by_name[key].implies if key in by_name else {}
            for other, other_value in implied.get(value, {}).items() if _primitive(value) else ():
                _set_path(tree, other, other_value)
        return TrainConfig.from_dict(tree, source=f"{self.source}: trial config")

    def levels(self, base: TrainConfig) -> set[str]:
        """Every store level a trial of this space can train on."""
        found = {self.trial_config(base, {}).data.level}
        for p in self.parameters:
            if p.name == "data.level":
                found |= {str(v) for v in p.values}
            found |= {str(v["data.level"]) for v in p.implies.values() if "data.level" in v}
        return found


def _examples() -> str:
    return "model.architecture, data.patch_size, optim.lr, loss, batch_size"


def _check_value(source: str, where: str, path: str, value: Any) -> None:
    """Does `value` fit the TrainConfig field `path`? (pydantic decides, on a default config)."""
    tree = TrainConfig().model_dump()
    _set_path(tree, path, value)
    try:
        TrainConfig.model_validate(tree)
    except Exception as exc:  # pydantic.ValidationError
        msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise ConfigError(f"{source}: {where}: {value!r} is not a valid {path} ({msg})") from None


def _parse_parameter(source, name, spec, fields, earlier: list[Parameter], fixed, declared: list) -> Parameter:
    where = f"parameters: {name}"

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{source}: {where}: {problem}")

    if name not in fields:
        raise fail(f"unknown parameter (not a TrainConfig field; e.g. {_examples()})")
    if name in fixed:
        raise fail("is also in 'fixed'; a field is either searched or fixed")
    if not isinstance(spec, dict):
        raise fail(f"expected a mapping such as {{choice: [...]}} or {{uniform: [low, high]}}, got {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and k not in ("when", "implies")]
    if extra:
        raise fail(f"unknown distribution type {', '.join(map(str, extra))} (use one of {', '.join(DISTRIBUTIONS)})")
    if len(kinds) != 1:
        raise fail(f"needs exactly one distribution ({', '.join(DISTRIBUTIONS)}), found {len(kinds)}")
    kind = kinds[0]
    values = spec[kind]

    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise fail("choice: needs a non-empty list of values")
        for v in values:
            _check_value(source, where, name, v)
    else:
        if not isinstance(values, list) or len(values) != 2 or not all(_is_number(v) for v in values):
            raise fail(f"{kind}: needs [low, high] as two numbers, got {values!r}")
        low, high = values
        if kind in ("int", "intlog") and not all(isinstance(v, int) for v in values):
            raise fail(f"{kind}: low and high must be integers, got {values!r}")
        if low >= high:
            raise fail(f"{kind}: low ({low}) must be < high ({high})")
        if kind in ("loguniform", "intlog") and low <= 0:
            raise fail(f"{kind}: a log scale needs low > 0, got {low}")
        # A float sampled for an int field would be rejected (or silently truncated) later.
        probes = [low, high] + ([(low + high) / 2 + 1e-3] if kind in ("uniform", "loguniform") else [])
        for v in probes:
            _check_value(source, where, name, v)

    when_raw = spec.get("when") or {}
    if not isinstance(when_raw, dict):
        raise fail("when: must be a mapping of parameter -> value (or list of values)")
    known = {p.name: p for p in earlier}
    when: dict[str, list] = {}
    for ref, allowed in when_raw.items():
        if ref not in known:
            if ref in declared:
                raise fail(f"when: condition on {ref!r}, which is declared below; conditions may only use parameters declared above")
            raise fail(f"when: condition on unknown parameter {ref!r} (not a searched parameter)")
        parent = known[ref]
        if parent.kind != "choice":
            raise fail(f"when: {ref} must be a choice parameter to be used in a condition")
        allowed = allowed if isinstance(allowed, list) and not parent.encoded else [allowed]
        missing = [a for a in allowed if a not in parent.values]
        if missing:
            raise fail(f"when: {ref} can never be {missing[0]!r} (its choices: {parent.values})")
        when[ref] = allowed

    implies_raw = spec.get("implies") or {}
    if implies_raw and kind != "choice":
        raise fail("implies: only a choice parameter can imply other fields")
    if not isinstance(implies_raw, dict):
        raise fail("implies: must be a mapping of choice value -> {field: value}")
    implies: dict[Any, dict[str, Any]] = {}
    searched = {p.name for p in earlier} | {name}
    for choice, sets in implies_raw.items():
        if choice not in values or not _primitive(choice):
            raise fail(f"implies: {choice!r} is not one of the choices {values}")
        if not isinstance(sets, dict):
            raise fail(f"implies: {choice}: must be a mapping of field -> value")
        for other, other_value in sets.items():
            if other not in fields:
                raise fail(f"implies: {choice}: {other}: unknown parameter (not a TrainConfig field)")
            if other in fixed or other in searched:
                raise fail(f"implies: {choice}: {other} is already fixed or searched")
            _check_value(source, f"{where}: implies: {choice}", other, other_value)
        implies[choice] = dict(sets)
    return Parameter(name=name, kind=kind, values=list(values), when=when, implies=implies)


# --------------------------------------------------------------------------- resources


def trial_concurrency(cfg: TrainConfig, resources: dict[str, float] | None = None) -> int:
    """How many trials fit at once: available CPUs (or GPUs) / what one trial holds."""
    import ray

    resources = resources if resources is not None else ray.available_resources()
    gpus = resources.get("GPU", 0.0)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    if use_gpu:
        return max(1, math.floor(gpus / cfg.num_workers))
    # Each trial's driver holds DRIVER_CPU beside its workers: with 2 CPUs and 1-CPU trials,
    # two trials need 2.02 CPUs and the second worker group would wait forever.
    per_trial = cfg.num_workers * getattr(cfg, "cpus_per_worker", 1) + DRIVER_CPU
    return max(1, math.floor(resources.get("CPU", 1.0) / per_trial + 1e-9))


# --------------------------------------------------------------------------- MLflow


def _find_run(client, experiment_id: str, tags: dict[str, str]):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _parent_run(client, experiment_id: str, sweep_dir: str, name: str, reuse: bool) -> str:
    if reuse:
        run = _find_run(client, experiment_id, {TAG_SWEEP: sweep_dir, "stroke_ray.kind": "sweep"})
        if run is not None:
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={TAG_SWEEP: sweep_dir, "stroke_ray.kind": "sweep"})
    return run.info.run_id


def _trial_run(client, experiment: str, parent_id: str, sweep_dir: str, trial_id: str) -> str:
    """The trial's nested run: the same one again when a resumed sweep re-runs the trial."""
    from stroke_ray.tracking import get_or_create_run

    return get_or_create_run(
        client, experiment, f"trial-{trial_id}", parent_run_id=parent_id,
        tags={TAG_TRIAL: trial_id, TAG_SWEEP: sweep_dir, "stroke_ray.kind": "trial"},
    )


# --------------------------------------------------------------------------- trial driver


@dataclass
class _TrialDriver:
    """The Tune trainable: one Ray Train job per trial (a picklable callable, no globals)."""

    space: SearchSpace
    base: dict
    sweep_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str

    def __call__(self, config: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from stroke_ray.tracking import client_for, log_params_flat
        from stroke_ray.train import build_trainer

        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        params = self.space.decode(flatten(config))
        cfg = self.space.trial_config(TrainConfig.model_validate(self.base), params)
        cfg = cfg.model_copy(update={"tracking_uri": self.tracking_uri})

        client = client_for(self.tracking_uri)
        run_id = _trial_run(client, self.experiment, self.parent_run_id, self.sweep_dir, trial_id)
        # The same flattened config the train loop would log (it skips runs that have params),
        # plus the sampled values under search.* so MLflow can compare trials on them alone.
        if not client.get_run(run_id).data.params:
            log_params_flat(client, run_id, {**cfg.model_dump(mode="json"), "search": params})
            client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        client.set_tag(run_id, "stroke_ray.trial_dir", ctx.get_trial_dir())
        trainer = build_trainer(
            cfg,
            run_name=f"trial-{trial_id}",
            storage_path=os.path.join(self.sweep_dir, "train"),
            callbacks=[TuneReportCallback()],
            mlflow_run_id=run_id,
        )
        try:
            trainer.fit()
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")


def _tune_callback_base():
    from ray import tune

    return tune.Callback


class _TrialCleanup(_tune_callback_base()):
    """Closes what a trial stopped by Tune (ASHA, a stopper) cannot close itself.

    Tune stops such a trial by ending its driver while the Ray Train run inside is still
    going, so (1) the trial's MLflow run is left RUNNING and (2) the Train worker group's
    placement group may outlive it: Ray Train's own cleaner needs the state API, which a
    local Ray without dashboard does not have, and the leaked CPUs then starve every later
    trial. Placement groups are released only when no other trial of this sweep is running,
    so a live trial's workers are never touched; Tune's own trial groups are kept.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_id: str):
        self.tracking_uri, self.experiment, self.parent_id = tracking_uri, experiment, parent_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trials, trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trials, trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        release_orphaned_train_groups()

    def _close(self, trials, trial, status: str) -> None:
        from stroke_ray.tracking import client_for, find_run

        client = client_for(self.tracking_uri)
        run_id = find_run(client, self.experiment, f"trial-{trial.trial_id}", self.parent_id)
        if run_id is not None and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
        if not any(t is not trial and t.status == "RUNNING" for t in trials):
            release_orphaned_train_groups()


def release_orphaned_train_groups() -> int:
    """Remove this job's placement groups other than Tune's trial groups; returns how many.

    Call only when no trial of this job is running (Train groups then have no owner left).
    """
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id, info in placement_group_table().items():
        if not pg_id.endswith(job) or info.get("state") not in ("CREATED", "PENDING", "RESCHEDULING"):
            continue
        if list(info.get("bundles", {}).values()) == [{"CPU": DRIVER_CPU}]:
            continue  # a trial driver's own group, Tune manages it
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
        removed += 1
    return removed


# --------------------------------------------------------------------------- results


@dataclass
class TrialSummary:
    trial_id: str
    status: str
    params: dict[str, Any]
    metric: float | None  # best value of the space's metric over the trial's epochs
    epochs: int
    checkpoint: str | None  # Train checkpoint directory matching `metric` (or the last one)
    error: str | None = None


@dataclass
class SweepResult:
    """What a sweep produced, and where."""

    name: str
    path: Path  # <storage>/<name>
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config: TrainConfig | None
    best_checkpoint: Path | None  # <storage>/<name>/best/checkpoint.pt
    parent_run_id: str
    model_version: str | None
    importances: dict[str, float]
    report_path: Path
    seconds: float

    def summary(self) -> str:
        lines = [f"sweep {self.name}: {len(self.trials)} trials in {self.seconds:.0f} s -> {self.path}"]
        if self.best is not None:
            lines.append(f"best trial {self.best.trial_id}: {self.metric} = {self.best.metric:.4f}")
            lines.append(f"best checkpoint: {self.best_checkpoint}")
        if self.model_version:
            from stroke_ray.tracking import CHAMPION_ALIAS, REGISTERED_MODEL

            lines.append(f"registered: models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS} (version {self.model_version})")
        lines.append(f"report: {self.report_path}")
        return "\n".join(lines)


def _error_line(error: BaseException) -> str:
    """The exception line of a trial's error (Ray puts the task name and traceback first)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(error).__name__


def _summarise(result, space: SearchSpace) -> TrialSummary:
    """One Tune Result -> the trial's best epoch (by the space's metric) and its checkpoint."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    config = result.config or {}
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    df = result.metrics_dataframe
    metric = None
    checkpoint = None
    epochs = 0
    if df is not None and len(df) and space.metric in df:
        epochs = int(df["training_iteration"].max()) if "training_iteration" in df else len(df)
        scored = df.dropna(subset=[space.metric])
        if len(scored):
            row = scored.loc[scored[space.metric].idxmax() if space.mode == "max" else scored[space.metric].idxmin()]
            metric = float(row[space.metric])
            if CHECKPOINT_PATH_KEY in df:
                # Prefer the best epoch's checkpoint; Train may have pruned it, then the last.
                candidates = [row.get(CHECKPOINT_PATH_KEY)] + list(df[CHECKPOINT_PATH_KEY].dropna()[::-1])
                checkpoint = next((c for c in candidates if isinstance(c, str) and exists(c)), None)
    status = "ERROR" if result.error else ("TERMINATED" if epochs else "NOT RUN")
    return TrialSummary(
        trial_id=str(trial_id),
        status=status,
        params=space.decode(flatten(config)),
        metric=metric,
        epochs=epochs,
        checkpoint=checkpoint,
        error=_error_line(result.error) if result.error else None,
    )


def _export_checkpoint(src: str, dest_dir: Path) -> Path:
    """Copy the winning Train checkpoint's checkpoint.pt to <sweep>/best/ (atomically)."""
    from ray.train import Checkpoint

    from stroke_ray.checkpoint import CHECKPOINT_FILE

    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / CHECKPOINT_FILE
    with Checkpoint(path=src).as_directory() as local:
        source = Path(local) / CHECKPOINT_FILE
        if not source.exists():
            raise StrokeRayError(f"{src}: checkpoint directory has no {CHECKPOINT_FILE}")
        with atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
    return dest


def _register_champion(client, run_id: str, checkpoint: Path) -> str:
    """Log the checkpoint to the best trial's run and point the champion alias at it.

    Re-running on the same run reuses its registered version instead of adding one.
    """
    from stroke_ray.tracking import CHAMPION_ALIAS, REGISTERED_MODEL, log_model, register_champion

    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'")
    if versions:
        uri = f"models:/{REGISTERED_MODEL}/{max(int(v.version) for v in versions)}"
    else:
        uri = log_model(client, run_id, checkpoint)
    return register_champion(uri, REGISTERED_MODEL, CHAMPION_ALIAS, client=client)


def param_importances(space: SearchSpace, trials: list[TrialSummary]) -> dict[str, float]:
    """Optuna's parameter importances from the finished trials ({} when fewer than two)."""
    import optuna

    done = [t for t in trials if t.metric is not None and math.isfinite(t.metric)]
    if len(done) < 2:
        return {}
    by_name = {p.name: p for p in space.parameters}
    study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
    for t in done:
        params = {k: (json.dumps(v) if by_name[k].encoded else v) for k, v in t.params.items() if k in by_name}
        dists = {k: by_name[k].distribution() for k in params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t.metric))
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError):
        return {}  # e.g. no parameter varied across the finished trials


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(path: Path, space: SearchSpace, trials: list[TrialSummary], best: TrialSummary | None,
                 best_config: TrainConfig | None, importances: dict[str, float]) -> str:
    """A markdown report of the sweep: trials table, best config, parameter importances."""
    names = [p.name for p in space.parameters]
    ordered = sorted(trials, key=lambda t: (t.metric is None, -(t.metric or 0) if space.mode == "max" else (t.metric or 0)))
    lines = [
        f"# Sweep {space.name}",
        "",
        f"{len(trials)} trials, metric `{space.metric}` ({space.mode}), search space `{space.source}`.",
        "",
        "## Trials",
        "",
        "| trial | status | " + " | ".join(names) + f" | {space.metric} | epochs |",
        "|" + "---|" * (len(names) + 4),
    ]
    for t in ordered:
        cells = [_fmt(t.params.get(n, "-")) for n in names]
        metric = "-" if t.metric is None else f"{t.metric:.4f}"
        lines.append(f"| {t.trial_id} | {t.status} | " + " | ".join(cells) + f" | {metric} | {t.epochs} |")
    lines += ["", "## Best configuration", ""]
    if best is None or best_config is None:
        lines.append("No trial reported the metric.")
    else:
        lines += [f"Trial {best.trial_id}: {space.metric} = {best.metric:.4f}.", "", "```yaml",
                  yaml.safe_dump(best_config.model_dump(), sort_keys=False).rstrip(), "```"]
    lines += ["", "## Parameter importances", ""]
    if importances:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    else:
        lines.append("Not available: needs at least two finished trials with different parameters.")
    errors = [t for t in trials if t.error]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {t.trial_id}: {t.error}" for t in errors]
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


# --------------------------------------------------------------------------- the sweep


def _trial_states(sweep_dir: Path) -> dict[str, tuple[str, bool]]:
    """trial id -> (status, reported anything) from Tune's newest experiment state."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    out = {}
    for entry in json.loads(states[-1].read_text()).get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        result = sweep_dir / str(trial.get("relative_logdir", "")) / "result.json"
        out[trial.get("trial_id")] = (trial.get("status"), result.is_file() and result.stat().st_size > 0)
    return out


def _reopen_search(sweep_dir: Path, num_samples: int) -> None:
    """Let a restored search generate the trials an interrupted session did not start.

    Tune marks its search as finished when a session is stopped early (stopper, time
    budget), and restores that flag, so a resumed sweep would never create its missing
    trials. The flag is cleared (and the total raised when `num_samples` asks for more) in
    Tune's newest search-generator state file, written the way Tune writes it.
    """
    from ray import cloudpickle

    states = sorted(sweep_dir.glob("search_gen_state-*.json"))
    if not states:
        return
    path = states[-1]
    with open(path, "rb") as f:
        state = cloudpickle.load(f)
    trials = _trial_states(sweep_dir)
    # A trial the stopped session had only just launched is TERMINATED with no result and
    # Tune will not run it again: the search makes a replacement for each.
    never_ran = sum(1 for status, reported in trials.values() if status == "TERMINATED" and not reported)
    total = max(int(state.get("total_samples", 0)), num_samples + never_ran)
    state["total_samples"] = total
    state["finished"] = False
    # The concurrency limiter may still count a trial that finished as the session stopped
    # (it never heard of its completion); restored, it would block every new trial.
    limiter = state.get("name:ConcurrencyLimiter")
    if isinstance(limiter, dict) and "live_trials" in limiter:
        unfinished = {t for t, (status, _) in trials.items() if status != "TERMINATED"}
        limiter["live_trials"] = {t for t in limiter["live_trials"] if t in unfinished}
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        cloudpickle.dump(state, f)


def _set_stop_conditions(tuner, stopper, time_budget_s: float | None, cleanup) -> None:
    """Give a restored Tuner this session's stop conditions.

    Tune restores the stopper and time budget pickled with the interrupted session, which
    would end the resumed session at the same point again; the public API has no setter.
    """
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:  # Ray client mode: keep Tune's restored settings
        return
    internal.get_run_config().stop = stopper
    internal.get_run_config().callbacks = [cleanup]  # this session's MLflow parent
    internal._tune_config.time_budget_s = time_budget_s


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
    verbose: int = 1,
) -> SweepResult:
    """Run (or resume) a sweep and export, register and report its best trial.

    `resume=True` continues `<storage_path>/<name>` when Tune left state there (finished
    trials are kept, unfinished and errored ones run again) and starts afresh otherwise.
    `time_budget_s` / `stopper` end a sweep early; it can then be resumed.
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from stroke_ray.raycluster import connect
    from stroke_ray.tracking import (
        client_for,
        default_tracking_uri,
        get_or_create_experiment,
        log_params_flat,
    )
    from stroke_ray.train import check_store

    started = time.time()
    space = SearchSpace.load(space_file)
    if is_url(storage_path):
        # Tune state under a URL needs pyarrow filesystems end to end; refuse rather than
        # write "s3://..." as a local folder that dies with this node.
        raise ConfigError(f"{storage_path}: sweep storage must be a local or shared folder, not a URL")
    storage = Path(absolute(storage_path))
    sweep_dir = storage / name
    tracking_uri = tracking_uri or base_config.tracking_uri or default_tracking_uri()
    # Tune runs each trial in its own working directory: make a local store path absolute.
    store = base_config.data.store
    if not is_url(store) and not Path(store).is_absolute():
        base_config = base_config.model_copy(deep=True)
        base_config.data.store = absolute(store)
    # The trials' configs and the store must validate before any compute is spent on them.
    probe = space.trial_config(base_config, {})
    check_store(probe.data.store, sorted(space.levels(base_config)))

    connect(address)
    restoring = resume and tune.Tuner.can_restore(str(sweep_dir))
    if not restoring and sweep_dir.exists() and tune.Tuner.can_restore(str(sweep_dir)):
        raise StrokeRayError(f"{sweep_dir}: a sweep named {name!r} already exists there; resume it or pick another name")

    client = client_for(tracking_uri)
    experiment_id = get_or_create_experiment(client, base_config.experiment)
    parent_id = _parent_run(client, experiment_id, str(sweep_dir), name, reuse=restoring)
    if not restoring:  # a resumed sweep keeps its original settings (and params)
        log_params_flat(client, parent_id, {
            "space": space.name, "space_file": str(space_file), "metric": space.metric, "mode": space.mode,
            "num_samples": num_samples or space.num_samples, "seed": seed,
            "fixed": dict(space.fixed),
        })
        client.log_artifact(parent_id, str(space_file), artifact_path="search_space")

    driver = _TrialDriver(space, base_config.model_dump(), str(sweep_dir), tracking_uri, base_config.experiment, parent_id)
    trainable = tune.with_resources(driver, {"CPU": DRIVER_CPU})
    cleanup = _TrialCleanup(tracking_uri, base_config.experiment, parent_id)
    release_orphaned_train_groups()  # left by an interrupted session in this process
    if restoring:
        _reopen_search(sweep_dir, num_samples or space.num_samples)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True, restart_errored=False)
        _set_stop_conditions(tuner, stopper, time_budget_s, cleanup)
    else:
        concurrency = max_concurrent or trial_concurrency(probe)
        searcher = OptunaSearch(
            space=space,
            metric=space.metric,
            mode=space.mode,
            sampler=optuna.samplers.TPESampler(seed=seed),
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
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
                scheduler=scheduler,
                num_samples=num_samples or space.num_samples,
                time_budget_s=time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), stop=stopper, verbose=verbose,
                callbacks=[cleanup],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    grid = tuner.fit()

    trials = [_summarise(r, space) for r in grid]
    # Sorted by trial id so ties (common in tiny sweeps) pick the same trial every time.
    scored = sorted((t for t in trials if t.metric is not None and t.checkpoint), key=lambda t: t.trial_id)
    best = None
    if scored:
        best = (max if space.mode == "max" else min)(scored, key=lambda t: t.metric)
    best_config = space.trial_config(base_config, best.params) if best else None
    best_checkpoint = None
    model_version = None
    if best is not None:
        best_checkpoint = _export_checkpoint(best.checkpoint, sweep_dir / "best")
        atomic_write_text(sweep_dir / "best" / "config.yaml", yaml.safe_dump(best_config.model_dump(), sort_keys=False))
        best_run = _find_run(client, experiment_id, {PARENT_TAG: parent_id, TAG_TRIAL: best.trial_id})
        client.set_tag(parent_id, "stroke_ray.best_trial", best.trial_id)
        client.log_metric(parent_id, f"best_{space.metric}", best.metric)
        if best_run is not None:
            client.set_tag(parent_id, "stroke_ray.best_run_id", best_run.info.run_id)
            if register:
                model_version = _register_champion(client, best_run.info.run_id, best_checkpoint)

    importances = param_importances(space, trials)
    report_path = sweep_dir / "report.md"
    text = write_report(report_path, space, trials, best, best_config, importances)
    client.log_artifact(parent_id, str(report_path))
    for k, v in importances.items():
        client.log_metric(parent_id, f"importance.{k}", v)
    # Unfinished trials (a time budget or stopper hit) leave the parent open for a resume.
    ran = [t for t in trials if t.status != "NOT RUN"]
    unfinished = len(ran) < (num_samples or space.num_samples) or any(t.status == "ERROR" for t in trials)
    if not unfinished:
        client.set_terminated(parent_id, status="FINISHED")
    if verbose:
        print(text)
    return SweepResult(
        name=name, path=sweep_dir, metric=space.metric, mode=space.mode, trials=trials, best=best,
        best_config=best_config, best_checkpoint=best_checkpoint, parent_run_id=parent_id,
        model_version=model_version, importances=importances, report_path=report_path,
        seconds=time.time() - started,
    )
