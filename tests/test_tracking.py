"""MLflow tracking on a real sqlite store: idempotent runs, params, metrics, overlays, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stroke_ray import tracking
from stroke_ray.checkpoint import load_checkpoint, save_checkpoint
from stroke_ray.config import TrainConfig
from stroke_ray.errors import StrokeRayError
from stroke_ray.models import build_model


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def client(store_dir):
    # One database for the module: creating MLflow's sqlite schema takes seconds.
    return tracking.client_for(f"sqlite:///{store_dir / 'mlflow.db'}")


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


def _checkpoint(directory):
    cfg = TrainConfig.from_dict({"model": {"widths": [4, 8, 16]}})
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1)
    return save_checkpoint(directory, model=model, epoch=1, config=cfg, modalities=["t1w"], normalization="zscore"), model


def test_model_logging_registry_and_resolution(client, tmp_path):
    uri = client.tracking_uri
    ckpt, model = _checkpoint(tmp_path / "ckpt")
    run = tracking.get_or_create_run(client, "exp-train", "train")
    model_uri = tracking.log_model(client, run, ckpt)
    assert model_uri == f"runs:/{run}/model"

    version = tracking.register_champion(model_uri, tags={"val_dice": 0.7}, tracking_uri=uri)
    assert version == "1"
    mv = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION_ALIAS)
    assert str(mv.version) == "1" and mv.tags["val_dice"] == "0.7" and mv.run_id == run

    x = torch.randn(1, 1, 8, 8, 8)
    model.eval()
    expected = model(x)
    refs = [
        str(ckpt),
        str(ckpt.parent),
        f"runs:/{run}/model",
        f"runs:/{run}/model/checkpoint.pt",
        f"models:/{tracking.REGISTERED_MODEL}@{tracking.CHAMPION_ALIAS}",
        f"models:/{tracking.REGISTERED_MODEL}/1",
    ]
    for i, ref in enumerate(refs):
        local = tracking.resolve_checkpoint(ref, tracking_uri=uri, dst=tmp_path / f"dl{i}")
        assert local.name == "checkpoint.pt", ref
        with torch.no_grad():
            assert torch.equal(load_checkpoint(local).model(x), expected), ref

    # A second registration moves the alias; registering a version of the same model reuses it.
    second = tracking.log_model(client, run, ckpt, registered_name=tracking.REGISTERED_MODEL)
    assert second == f"models:/{tracking.REGISTERED_MODEL}/2"
    assert tracking.register_champion(second, tracking_uri=uri) == "2"
    assert str(client.get_model_version_by_alias(tracking.REGISTERED_MODEL, "champion").version) == "2"


def test_bad_references_give_one_clear_error(client, tmp_path):
    uri = client.tracking_uri
    with pytest.raises(StrokeRayError, match="no such checkpoint file"):
        tracking.resolve_checkpoint(str(tmp_path / "missing.pt"), tracking_uri=uri)
    with pytest.raises(StrokeRayError, match="models:/nobody@champion: cannot resolve"):
        tracking.resolve_checkpoint("models:/nobody@champion", tracking_uri=uri)
    run = tracking.get_or_create_run(client, "exp-empty", "empty")
    client.log_text(run, "not a model", "model/README.txt")
    with pytest.raises(StrokeRayError, match="holds no checkpoint.pt"):
        tracking.resolve_checkpoint(f"runs:/{run}/model", tracking_uri=uri, dst=tmp_path / "dl")
