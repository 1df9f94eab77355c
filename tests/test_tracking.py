"""MLflow tracking on a real sqlite store: idempotent runs, params, metrics, overlays."""

from __future__ import annotations

import numpy as np
import pytest

from stroke_ray import tracking
from stroke_ray.errors import StrokeRayError


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def client(store_dir, new_mlflow_uri):
    # One database for the module, copied from the session's template (its schema is made).
    return tracking.client_for(new_mlflow_uri(store_dir))


def test_default_tracking_uri_is_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_runs_are_found_again_not_duplicated(client, store_dir):
    parent = tracking.get_or_create_run(client, "exp", "sweep")
    a = tracking.get_or_create_run(client, "exp", "trial-1", parent_run_id=parent)
    client.set_terminated(a, "FINISHED")
    assert tracking.get_or_create_run(client, "exp", "trial-1", parent_run_id=parent) == a
    assert client.get_run(a).info.status == "RUNNING"  # reopened for the resumed work
    # Same name without the parent, and a name with a quote, are different runs.
    b = tracking.get_or_create_run(client, "exp", "trial-1")
    c = tracking.get_or_create_run(client, "exp", "it's")
    d = tracking.get_or_create_run(client, "exp", """both ' and " quotes""")
    assert len({parent, a, b, c, d}) == 5
    assert tracking.get_or_create_run(client, "exp", "it's") == c
    assert tracking.get_or_create_run(client, "exp", """both ' and " quotes""") == d
    exp = client.get_experiment_by_name("exp")
    assert len(client.search_runs([exp.experiment_id])) == 5
    assert exp.artifact_location.startswith(str(store_dir / "mlartifacts"))


def test_params_flat_are_idempotent_and_refuse_changes(client):
    run = tracking.get_or_create_run(client, "exp-p", "p")
    nested = {"optim": {"lr": 0.001}, "model": {"widths": [4, 8]}, "epochs": 2}
    tracking.log_params_flat(client, run, nested)
    tracking.log_params_flat(client, run, nested)  # identical again: fine
    assert client.get_run(run).data.params == {"optim.lr": "0.001", "model.widths": "[4, 8]", "epochs": "2"}
    with pytest.raises(StrokeRayError, match=r"epochs: '2' -> '3'"):
        tracking.log_params_flat(client, run, {**nested, "epochs": 3})


def test_metrics_skip_steps_already_logged(client):
    run = tracking.get_or_create_run(client, "exp-m", "m")
    tracking.log_metrics(client, run, {"val_dice": 0.1, "note": "text is skipped"}, step=0)
    tracking.log_metrics(client, run, {"val_dice": 0.9}, step=0)  # a redone epoch
    tracking.log_metrics(client, run, {"val_dice": 0.3}, step=1)
    history = client.get_metric_history(run, "val_dice")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.1), (1, 0.3)]
    assert "note" not in client.get_run(run).data.metrics


def test_overlays_are_png_artifacts(client, tmp_path):
    run = tracking.get_or_create_run(client, "exp-o", "o")
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 24, 24, 16)).astype(np.float32)
    truth = np.zeros((24, 24, 16), np.uint8)
    truth[8:14, 8:14, 5:11] = 1
    pred = np.roll(truth, 2, axis=0)
    path = tracking.log_overlays(client, run, image, truth, pred, name="epoch001_sub-1")
    assert path == "overlays/epoch001_sub-1.png"
    local = client.download_artifacts(run, path, str(tmp_path / "dl"))
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Slices go through the lesion.
    assert all(5 <= z <= 10 for z in tracking._slices(truth > 0, pred > 0, 3))


def test_sweep_parent_run_records_settings_best_trial_report_and_end(client, tmp_path):
    exp_id = tracking.get_or_create_experiment(client, "exp-s")
    parent = tracking.sweep_parent_run(client, exp_id, str(tmp_path / "sweep"), "sweep", reuse=False)
    space_file = tmp_path / "space.yaml"
    space_file.write_text("metric: val_dice\n")
    tracking.log_sweep_settings(client, parent, {"metric": "val_dice", "fixed": {"epochs": 2}}, space_file)
    tracking.log_best_trial(client, parent, "t1", "val_dice", 0.5, run_id=None)  # its run not found
    assert tracking.BEST_RUN_TAG not in client.get_run(parent).data.tags
    tracking.log_best_trial(client, parent, "t2", "val_dice", 0.75, run_id="run-2")
    tracking.log_sweep_report(client, parent, "# report\n", {"optim.lr": 0.8})
    assert client.get_run(parent).info.status == "RUNNING"
    tracking.close_sweep_run(client, parent)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"metric": "val_dice", "fixed.epochs": "2"}
    assert run.data.tags[tracking.BEST_TRIAL_TAG] == "t2" and run.data.tags[tracking.BEST_RUN_TAG] == "run-2"
    assert run.data.metrics == {"best_val_dice": 0.75, "importance.optim.lr": 0.8}
    assert {f.path for f in client.list_artifacts(parent)} == {"search_space", "report.md"}
    assert [f.path for f in client.list_artifacts(parent, "search_space")] == ["search_space/space.yaml"]
