"""Sweep pictures: drawn from trial summaries and logged to the parent run as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stroke_ray import tracking
from stroke_ray.resources import search_space_file
from stroke_ray.search_space import SearchSpace
from stroke_ray.sweep_figures import learning_curves, log_sweep_figures, parallel_coordinates
from stroke_ray.sweep_report import TrialSummary

SMOKE = search_space_file("smoke")


def _trials(space: SearchSpace) -> list[TrialSummary]:
    rng = np.random.default_rng(0)
    trials = []
    for i in range(5):
        params = {"model.architecture": ["unet3d", "unet2plus1d"][i % 2], "model.widths": [[8, 16, 32], [16, 32, 64]][i % 2],
                  "data.patch_size": [24, 32][i % 2], "loss": "dice_ce", "data.foreground_fraction": 0.35 + 0.06 * i,
                  "optim.lr": float(10 ** rng.uniform(-2.7, -2))}
        curve = list(np.cumsum(rng.uniform(0, 0.2, 2 + 2 * (i % 2))))
        trials.append(TrialSummary(trial_id=f"t{i}", status="TERMINATED", params=params, metric=max(curve),
                                   epochs=len(curve), checkpoint=None, curve=curve))
    trials.append(TrialSummary(trial_id="t5", status="ERROR", params={}, metric=None, epochs=0, checkpoint=None))
    return trials


def test_figures_show_every_finished_trial(tmp_path):
    space = SearchSpace.load(SMOKE)
    trials = _trials(space)
    parallel = parallel_coordinates(space, trials)
    lines = parallel.axes[0].get_lines()
    assert len(lines) == 5 + len(space.parameters) + 1  # one per finished trial, one per axis
    curves = learning_curves(space, trials)
    assert [len(line.get_xdata()) for line in curves.axes[0].get_lines()] == [2, 4, 2, 4, 2]


def test_figures_are_logged_to_the_parent_run(tmp_path, new_mlflow_uri):
    space = SearchSpace.load(SMOKE)
    client = tracking.client_for(new_mlflow_uri(tmp_path))
    run = tracking.get_or_create_run(client, "figures", "sweep")
    paths = log_sweep_figures(client, run, space, _trials(space), {"optim.lr": 0.7, "loss": 0.3})
    logged = {a.path: a.file_size for a in client.list_artifacts(run, "figures")}
    assert set(paths) == set(logged) == {"figures/parallel_coordinates.png", "figures/param_importances.png",
                                         "figures/learning_curves.png"}
    assert all(size > 5000 for size in logged.values())
    local = client.download_artifacts(run, "figures/learning_curves.png", str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
