"""Experiment tracking on MLflow: experiments, runs, params, metrics, overlay images.

Everything goes through `MlflowClient` with explicit run ids: no global active run, so the
same functions work in the driver, inside a Ray Train worker and inside a Ray Tune trial.
Runs are found again by a tag (`stroke_ray.run_name`, plus the parent run id for nested
runs), so a resumed training or sweep logs into the run it started instead of creating a
duplicate.

A sweep is one parent run with one nested run per trial (`sweep_parent_run`, `trial_run`),
found again by the tags below when it resumes; what the parent run records of the sweep as a
whole (settings, best trial, report, importances) is written by the `*sweep*` functions here.
Models and the registry are `model_ref`'s.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stroke_ray.config import flatten
from stroke_ray.errors import StrokeRayError

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "BEST_RUN_TAG",
    "BEST_TRIAL_TAG",
    "KIND_TAG",
    "PARENT_TAG",
    "RUN_NAME_TAG",
    "TAG_SWEEP",
    "TAG_TRIAL",
    "client_for",
    "close_sweep_run",
    "close_trial_run",
    "default_tracking_uri",
    "find_run",
    "find_run_by_tags",
    "get_or_create_experiment",
    "get_or_create_run",
    "log_metrics",
    "log_best_trial",
    "log_overlays",
    "log_params_flat",
    "log_sweep_report",
    "log_sweep_settings",
    "log_text",
    "logged_steps",
    "overlay_figure",
    "sweep_parent_run",
    "trial_run",
]

RUN_NAME_TAG = "stroke_ray.run_name"
# MLflow 3's UI opens an experiment on its training runs, not its GenAI (traces) view, when
# the experiment carries this kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow's own tag for a nested run's parent (the UI nests runs by it).
PARENT_TAG = "mlflow.parentRunId"
# Tags that make a sweep's MLflow runs findable again when the sweep resumes.
KIND_TAG = "stroke_ray.kind"  # "sweep", "trial" or "train"
TAG_SWEEP = "stroke_ray.sweep_dir"
TAG_TRIAL = "stroke_ray.trial_id"
# What a sweep's parent run says of its winner.
BEST_TRIAL_TAG = "stroke_ray.best_trial"
BEST_RUN_TAG = "stroke_ray.best_run_id"


def default_tracking_uri() -> str:
    """`sqlite:///<abs cwd>/mlflow.db`: MLflow 3 refuses the plain file store by default."""
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def client_for(tracking_uri: str | None = None):
    """An MlflowClient on `tracking_uri` (default: the local sqlite file), registry included."""
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a local sqlite store sit beside the database, at an absolute path.

    Without this MLflow puts them under the *current* directory of whichever process
    creates the experiment, which differs between the driver and Ray workers.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment).strip("-") or "experiment"
    digest = hashlib.sha1(experiment.encode()).hexdigest()[:8]
    return str(db.parent / "mlartifacts" / f"{slug}-{digest}")


def get_or_create_experiment(client, experiment: str) -> str:
    """Experiment id by name, creating it if needed (safe when trials race to create it).

    The experiment is tagged as a model-training experiment (`EXPERIMENT_KIND`), so the
    MLflow UI opens on its runs.
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before the tag, or by another tool
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(
            experiment, artifact_location=_artifact_location(client.tracking_uri, experiment),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except MlflowException:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def find_run(client, experiment: str, run_name: str, parent_run_id: str | None = None) -> str | None:
    """The id of the run tagged with `run_name` (under `parent_run_id`), or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    # MLflow's filter grammar has no escapes: quote with a character the name lacks, or
    # fall back to listing every tagged run of the experiment (names with both quotes).
    quote = next((q for q in ("'", '"') if q not in run_name), None)
    filter_string = (
        f"tags.`{RUN_NAME_TAG}` = {quote}{run_name}{quote}" if quote else f"tags.`{RUN_NAME_TAG}` LIKE '%'"
    )
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        if run.data.tags.get(RUN_NAME_TAG) != run_name:
            continue
        if run.data.tags.get(PARENT_TAG) == parent_run_id:
            return run.info.run_id
    return None


def get_or_create_run(
    client,
    experiment: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Run id of `run_name` in `experiment`, creating the run only if it does not exist."""
    existing = find_run(client, experiment, run_name, parent_run_id)
    if existing is not None:
        if client.get_run(existing).info.status != "RUNNING":
            client.update_run(existing, status="RUNNING")
        return existing
    all_tags = {RUN_NAME_TAG: run_name, **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id is not None:
        all_tags[PARENT_TAG] = parent_run_id
    exp_id = get_or_create_experiment(client, experiment)
    return client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id


def find_run_by_tags(client, experiment_id: str, tags: Mapping[str, str]):
    """The newest run of the experiment carrying all `tags`, or None."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def sweep_parent_run(client, experiment_id: str, sweep_dir: str, name: str, reuse: bool) -> str:
    """The sweep's parent run: the one tagged with `sweep_dir` when `reuse`, else a new one."""
    tags = {TAG_SWEEP: sweep_dir, KIND_TAG: "sweep"}
    if reuse:
        run = find_run_by_tags(client, experiment_id, tags)
        if run is not None:
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def trial_run(client, experiment: str, parent_id: str, sweep_dir: str, trial_id: str) -> str:
    """A trial's nested run: the same one again when a resumed sweep re-runs the trial."""
    return get_or_create_run(
        client, experiment, f"trial-{trial_id}", parent_run_id=parent_id,
        tags={TAG_TRIAL: trial_id, TAG_SWEEP: sweep_dir, KIND_TAG: "trial"},
    )


def close_trial_run(tracking_uri: str, experiment: str, parent_id: str, trial_id: str, status: str) -> None:
    """End a trial's run with `status` if it is still RUNNING (Tune stopped its driver)."""
    client = client_for(tracking_uri)
    run_id = find_run(client, experiment, f"trial-{trial_id}", parent_id)
    if run_id is not None and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def log_sweep_settings(client, parent_id: str, settings: Mapping[str, Any], space_file: str | Path) -> None:
    """A new sweep's settings as params of its parent run, and its search-space file as an artifact."""
    log_params_flat(client, parent_id, settings)
    client.log_artifact(parent_id, str(space_file), artifact_path="search_space")


def log_best_trial(client, parent_id: str, trial_id: str, metric: str, value: float, run_id: str | None) -> None:
    """The sweep's best trial on its parent run: its id, `best_<metric>` and, when found, its run."""
    client.set_tag(parent_id, BEST_TRIAL_TAG, trial_id)
    client.log_metric(parent_id, f"best_{metric}", value)
    if run_id is not None:
        client.set_tag(parent_id, BEST_RUN_TAG, run_id)


def log_sweep_report(client, parent_id: str, report: str, importances: Mapping[str, float]) -> None:
    """The sweep's report.md and its parameter importances (`importance.<param>`) on the parent run."""
    client.log_text(parent_id, report, "report.md")
    for name, value in importances.items():
        client.log_metric(parent_id, f"importance.{name}", value)


def close_sweep_run(client, parent_id: str) -> None:
    """End the sweep's parent run as FINISHED (every trial ran; nothing is left to resume)."""
    client.set_terminated(parent_id, status="FINISHED")


def log_params_flat(client, run_id: str, nested: Mapping[str, Any]) -> dict[str, str]:
    """Log a nested dict as dotted params, skipping those already logged with the same value.

    MLflow refuses to change a logged param, so a changed value is an error worth seeing:
    it means a resumed run was given a different config.
    """
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    flat = {k: str(v) for k, v in flatten(nested).items()}  # lists become their repr
    changed = {k: (have[k], v) for k, v in flat.items() if k in have and have[k] != v}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise StrokeRayError(f"MLflow run {run_id} was logged with other params ({detail})")
    new = [Param(k, v[:6000]) for k, v in flat.items() if k not in have]
    for start in range(0, len(new), 100):  # MLflow's per-batch param limit
        client.log_batch(run_id, params=new[start : start + 100])
    return flat


def logged_steps(client, run_id: str, key: str) -> set[int]:
    """Steps at which `key` was already logged in this run."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_metrics(
    client, run_id: str, metrics: Mapping[str, float], step: int, skip_logged: bool = True
) -> None:
    """Log numeric metrics at `step`; with `skip_logged`, keys already at that step are kept.

    A worker restarted from a checkpoint may redo an epoch it already logged; skipping keeps
    each curve free of duplicate points.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    todo = []
    for key, value in metrics.items():
        if value is None or isinstance(value, (str, bytes, bool)):
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if skip_logged and step in logged_steps(client, run_id, key):
            continue
        todo.append(Metric(key, value, now, int(step)))
    if todo:
        client.log_batch(run_id, metrics=todo)


def _slices(truth: np.ndarray, pred: np.ndarray, n: int) -> list[int]:
    """Axial slices through the lesion (truth, else prediction), else through the middle."""
    depth = truth.shape[2]
    area = truth.reshape(-1, depth).sum(0)
    if area.sum() == 0:
        area = pred.reshape(-1, depth).sum(0)
    if area.sum() == 0:
        return sorted({int(round(x)) for x in np.linspace(depth * 0.3, depth * 0.7, n)})
    lesion = np.nonzero(area)[0]
    picks = np.linspace(lesion.min(), lesion.max(), n + 2)[1:-1] if n > 1 else [area.argmax()]
    return sorted({int(round(x)) for x in picks})


def overlay_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, n_slices: int = 3, title: str = ""):
    """A matplotlib figure: n axial slices of channel 0 with truth (green) and prediction (red) contours."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    image = np.asarray(image)
    base = image[0] if image.ndim == 4 else image
    truth = np.asarray(truth) > 0
    pred = np.asarray(pred) > 0
    zs = _slices(truth, pred, n_slices)
    fig = Figure(figsize=(3 * len(zs), 3.3), dpi=80)
    lo, hi = np.percentile(base, [1, 99]) if base.size else (0, 1)
    for i, z in enumerate(zs):
        ax = fig.add_subplot(1, len(zs), i + 1)
        # Transpose so the first voxel axis runs left-right, as radiological viewers show it.
        ax.imshow(base[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
        for mask, colour in ((truth, "lime"), (pred, "red")):
            sl = mask[:, :, z].T.astype(float)
            if sl.any() and not sl.all():
                ax.contour(sl, levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(f"z={z}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(f"{title}  (green: truth, red: prediction)", fontsize=8)
    return fig


def log_overlays(
    client,
    run_id: str,
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    name: str,
    n_slices: int = 3,
    artifact_path: str = "overlays",
) -> str:
    """Log a PNG of `n_slices` axial overlays under `artifact_path/<name>.png`; returns its artifact path."""
    fig = overlay_figure(image, truth, pred, n_slices=n_slices, title=name)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / f"{name}.png"
        fig.savefig(png)
        client.log_artifact(run_id, str(png), artifact_path)
    return f"{artifact_path}/{name}.png"


def log_text(client, run_id: str, text: str, artifact_file: str) -> None:
    """Log a small text file (e.g. the config YAML) as an artifact."""
    client.log_text(run_id, text, artifact_file)
