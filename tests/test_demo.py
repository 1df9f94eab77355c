"""The README's main job, end to end: synthetic cases -> store -> sweep -> champion -> masks."""

from __future__ import annotations

import contextlib
import csv
import io

import nibabel as nib
import numpy as np
import pytest

# Ray Train / Tune / Serve: the whole module is in the slow suite.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    from stroke_ray.demo import run_demo

    work = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        first = run_demo(work, num_cases=3, num_samples=1, progress=True)
    first.printed = printed.getvalue()
    # What a second run must leave alone: the cases' files and the trials' checkpoints.
    first.files = {p: p.stat().st_mtime_ns for p in first.dataset.rglob("*.nii.gz")}
    first.checkpoints = sorted(first.sweep_dir.glob("train/*/checkpoint_*"))
    second = run_demo(work, num_cases=3, num_samples=1, progress=False)
    return first, second


def test_demo_prints_a_short_readable_log(demo):
    """One line per stage and one progress line per stage; Ray's own output in sweep.log."""
    result, _ = demo
    # Lines as a terminal shows them: a progress bar redraws its own line ("\r"), so only
    # newlines count (splitlines() would count every redraw, as many as the run's timing makes).
    lines = [line for line in result.printed.split("\n") if line.strip()]
    assert len(lines) < 40, result.printed
    assert any(line.startswith("[demo] done") for line in lines)
    for ray_chatter in ("Trial status", "TrainingReport", "Reporting training result", "+-----"):
        assert ray_chatter not in result.printed
    log = (result.sweep_dir / "sweep.log").read_text()
    assert "epoch 1: val_dice" in log and "Trial status" in log


def test_demo_predicts_the_held_out_cases_in_their_own_space(demo):
    from stroke_ray.datasets import discover
    from stroke_ray.splits import split_subjects

    result, _ = demo
    cases = {c.subject: c for c in discover(result.dataset, layout="isles22")[0]}
    _, held_out = split_subjects(sorted(cases), 0.2, 0)
    rows = list(csv.DictReader((result.predictions / "predictions.csv").open()))
    assert [r["subject"] for r in rows] == held_out == [m["subject"] for m in result.metrics]
    for row in rows:
        mask = nib.load(result.predictions / row["mask_file"])
        dwi = nib.load(cases[row["subject"]].images["dwi"])
        assert mask.shape == dwi.shape and np.allclose(mask.affine, dwi.affine)
        for key in ("volume_ml", "truth_volume_ml", "dice", "lesion_f1"):
            assert np.isfinite(float(row[key]))
    assert "mlflow ui --backend-store-uri sqlite:///" in result.summary()


def test_demo_registers_the_sweep_champion(demo):
    from stroke_ray.model_ref import CHAMPION_ALIAS, REGISTERED_MODEL
    from stroke_ray.tracking import client_for

    result, _ = demo
    client = client_for(result.tracking_uri)
    version = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
    best_run = client.get_run(version.run_id)
    assert best_run.data.tags["mlflow.parentRunId"]
    assert (result.sweep_dir / "best" / "checkpoint.pt").is_file()


def test_a_second_run_reuses_everything(demo):
    from stroke_ray.tracking import client_for

    first, second = demo
    # Not regenerated, not retrained: the same files untouched, no new checkpoints.
    assert first.files and {p: p.stat().st_mtime_ns for p in second.dataset.rglob("*.nii.gz")} == first.files
    assert first.checkpoints and sorted(second.sweep_dir.glob("train/*/checkpoint_*")) == first.checkpoints
    client = client_for(second.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("stroke-ray-demo").experiment_id])
    assert len(runs) == 2  # the sweep's parent and its one trial, not a second set
    assert [m["dice"] for m in second.metrics] == [m["dice"] for m in first.metrics]
