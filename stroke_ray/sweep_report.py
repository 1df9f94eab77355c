"""What a sweep found: one summary per trial, parameter importances, the markdown report.

`summarise` turns each Tune result into a `TrialSummary` (the trial's best epoch by the
space's metric and the checkpoint of that epoch); `param_importances` asks Optuna which
parameters mattered (fANOVA on the finished trials); `write_report` writes `report.md`
beside the sweep's Tune state.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stroke_ray.config import TrainConfig, flatten
from stroke_ray.locations import exists, storage_uri, write_text
from stroke_ray.ray_compat import checkpoint_path_key
from stroke_ray.search_space import SearchSpace

__all__ = ["TrialSummary", "error_line", "param_importances", "summarise", "write_report"]


@dataclass
class TrialSummary:
    """One trial as the report shows it: its sampled values and its best epoch."""

    trial_id: str
    status: str
    params: dict[str, Any]
    metric: float | None  # best value of the space's metric over the trial's epochs
    epochs: int
    checkpoint: str | None  # Train checkpoint directory matching `metric` (or the last one)
    error: str | None = None
    curve: list[float] = field(default_factory=list)  # the metric at each reported epoch


def error_line(error: BaseException) -> str:
    """The exception line of a trial's error (Ray puts the task name and traceback first)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(error).__name__


def summarise(result, space: SearchSpace, storage: str | None = None) -> TrialSummary:
    """One Tune Result -> the trial's best epoch (by the space's metric) and its checkpoint.

    `storage` is the sweep's storage location: Ray reports a checkpoint by its path inside
    that filesystem, which becomes a location of its own (`locations.storage_uri`).
    """
    checkpoint_key = checkpoint_path_key()
    config = result.config or {}
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    df = result.metrics_dataframe
    metric = None
    checkpoint = None
    epochs = 0
    curve: list[float] = []
    if df is not None and len(df) and space.metric in df:
        epochs = int(df["training_iteration"].max()) if "training_iteration" in df else len(df)
        scored = df.dropna(subset=[space.metric])
        curve = [float(v) for v in scored[space.metric]]
        if len(scored):
            row = scored.loc[scored[space.metric].idxmax() if space.mode == "max" else scored[space.metric].idxmin()]
            metric = float(row[space.metric])
            if checkpoint_key in df:
                # Prefer the best epoch's checkpoint; Train may have pruned it, then the last.
                candidates = [row.get(checkpoint_key)] + list(df[checkpoint_key].dropna()[::-1])
                candidates = [storage_uri(storage, c) if storage and isinstance(c, str) else c for c in candidates]
                checkpoint = next((c for c in candidates if isinstance(c, str) and exists(c)), None)
    status = "ERROR" if result.error else ("TERMINATED" if epochs else "NOT RUN")
    return TrialSummary(
        trial_id=str(trial_id),
        status=status,
        params=space.decode(flatten(config)),
        metric=metric,
        epochs=epochs,
        checkpoint=checkpoint,
        error=error_line(result.error) if result.error else None,
        curve=curve,
    )


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


def write_report(path: Path | str, space: SearchSpace, trials: list[TrialSummary], best: TrialSummary | None,
                 best_config: TrainConfig | None, importances: dict[str, float]) -> str:
    """A markdown report of the sweep (trials table, best config, parameter importances),
    written whole to `path`, a local file or an object-store URL."""
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
    write_text(path, text)
    return text
