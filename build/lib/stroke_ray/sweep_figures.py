"""Pictures of a sweep, logged as PNG artifacts of its parent MLflow run (`figures/`).

- `parallel_coordinates.png`: one vertical axis per searched parameter and one for the
  metric, one line per finished trial, coloured by its metric (choices are spread evenly
  on their axis, log-scale parameters drawn in log10);
- `param_importances.png`: Optuna's importances (when there are enough trials);
- `learning_curves.png`: the metric per epoch of every trial, early-stopped ones included.

Drawn with matplotlib's Agg backend into `Figure` objects (no display, no global pyplot
state), so they can be made in any process.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from stroke_ray.search_space import Parameter, SearchSpace
from stroke_ray.sweep_report import TrialSummary

__all__ = ["FIGURES_ARTIFACT", "learning_curves", "log_sweep_figures", "parallel_coordinates", "param_importance_bars"]

FIGURES_ARTIFACT = "figures"


def _finished(space: SearchSpace, trials: list[TrialSummary]) -> list[TrialSummary]:
    return [t for t in trials if t.metric is not None and math.isfinite(t.metric)]


def _axis_values(p: Parameter, trials: list[TrialSummary]) -> tuple[list[float | None], list[float], list[str]]:
    """Each trial's position on the parameter's axis (None = inactive), plus tick positions and labels."""
    if p.kind == "choice":
        labels = [json.dumps(v) if not isinstance(v, str) else v for v in p.values]
        index = {json.dumps(v, sort_keys=True): i for i, v in enumerate(p.values)}
        positions = [index.get(json.dumps(t.params[p.name], sort_keys=True)) if p.name in t.params else None
                     for t in trials]
        return positions, list(range(len(labels))), labels
    low, high = (float(v) for v in p.values)
    log = p.kind in ("loguniform", "intlog")
    scale = math.log10 if log else (lambda x: x)
    positions = [scale(float(t.params[p.name])) if p.name in t.params else None for t in trials]
    ticks = list(np.linspace(scale(low), scale(high), 3))
    labels = [f"{(10 ** x if log else x):.3g}" for x in ticks]
    return positions, ticks, labels


def parallel_coordinates(space: SearchSpace, trials: list[TrialSummary]) -> Figure:
    """One axis per parameter plus the metric; one line per finished trial."""
    done = _finished(space, trials)
    fig = Figure(figsize=(max(6.0, 1.6 * (len(space.parameters) + 1)), 4.2), dpi=90)
    ax = fig.add_subplot(1, 1, 1)
    names = [p.name for p in space.parameters] + [space.metric]
    if not done:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return fig
    columns, ticks = [], []
    for p in space.parameters:
        positions, tick_pos, tick_labels = _axis_values(p, done)
        columns.append(positions)
        ticks.append((tick_pos, tick_labels))
    metrics = [t.metric for t in done]
    columns.append(metrics)
    lo, hi = min(metrics), max(metrics)
    ticks.append((list(np.linspace(lo, hi, 3)) if hi > lo else [lo], None))
    def unit(value, axis):
        # Every axis is drawn on [0, 1] by its own tick range; inactive parameters mid-axis.
        tick_pos = ticks[axis][0]
        a, b = min(tick_pos), max(tick_pos)
        return 0.5 if value is None or b == a else (value - a) / (b - a)

    cmap = matplotlib.colormaps["viridis"]
    span = (hi - lo) or 1.0
    for row, trial in enumerate(done):
        ys = [unit(columns[axis][row], axis) for axis in range(len(names))]
        good = (trial.metric - lo) / span if space.mode == "max" else (hi - trial.metric) / span
        ax.plot(range(len(names)), ys, color=cmap(good), alpha=0.8, linewidth=1.5)
    for axis, (tick_pos, tick_labels) in enumerate(ticks):
        ax.axvline(axis, color="grey", linewidth=0.8)
        labels = tick_labels or [f"{v:.3g}" for v in tick_pos]
        for pos, label in zip(tick_pos, labels):
            ax.text(axis + 0.03, unit(pos, axis), str(label)[:14], fontsize=7, va="center")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(names) - 0.5)
    ax.set_title(f"Sweep {space.name}: {len(done)} finished trials, colour = {space.metric} ({space.mode})", fontsize=9)
    fig.tight_layout()
    return fig


def param_importance_bars(importances: dict[str, float], metric: str) -> Figure:
    """Horizontal bars of Optuna's parameter importances (a note when there are none)."""
    fig = Figure(figsize=(6.0, 0.5 + 0.4 * max(1, len(importances))), dpi=90)
    ax = fig.add_subplot(1, 1, 1)
    if not importances:
        ax.text(0.5, 0.5, "needs at least two finished trials with different parameters",
                ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.axis("off")
        return fig
    items = sorted(importances.items(), key=lambda kv: kv[1])
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel(f"importance for {metric} (fANOVA, sums to 1)", fontsize=8)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def learning_curves(space: SearchSpace, trials: list[TrialSummary]) -> Figure:
    """The metric per epoch of every trial that reported one."""
    fig = Figure(figsize=(6.5, 4.0), dpi=90)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for t in sorted(trials, key=lambda t: t.trial_id):
        if t.curve:
            ax.plot(range(1, len(t.curve) + 1), t.curve, marker="o", markersize=3, linewidth=1.2, label=t.trial_id)
            drawn += 1
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel(space.metric, fontsize=8)
    ax.set_title(f"Learning curves of {drawn} trials (short ones were stopped early)", fontsize=9)
    if drawn and drawn <= 12:
        ax.legend(fontsize=7)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def log_sweep_figures(client, run_id: str, space: SearchSpace, trials: list[TrialSummary],
                      importances: dict[str, float]) -> list[str]:
    """Draw the three pictures and log them under `figures/` of the run; returns their artifact paths."""
    figures = {
        "parallel_coordinates.png": parallel_coordinates(space, trials),
        "param_importances.png": param_importance_bars(importances, space.metric),
        "learning_curves.png": learning_curves(space, trials),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in figures.items():
            fig.savefig(Path(tmp) / name)
        client.log_artifacts(run_id, tmp, FIGURES_ARTIFACT)
    return [f"{FIGURES_ARTIFACT}/{name}" for name in figures]
