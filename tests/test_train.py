"""Training on real local Ray Train: checkpoints, metrics, MLflow, resume, worker restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stroke_ray import model_ref, tracking
from stroke_ray.checkpoint import CHECKPOINT_FILE, load_checkpoint
from stroke_ray.config import TrainConfig
from stroke_ray.errors import ConfigError, StrokeRayError
from stroke_ray.grid import cube_affine
from stroke_ray.store import LevelArrays, StrokeStore
from stroke_ray.train import build_trainer, lr_at, run_training, train_loop_per_worker

# Ray Train / Tune / Serve: the whole module is in the slow suite.
pytestmark = pytest.mark.slow

REPORTED = {
    "epoch", "train_loss", "val_dice", "val_abs_volume_diff_ml", "val_abs_lesion_count_diff",
    "val_lesion_f1", "step_time_s", "epoch_time_s", "first_step_s", "val_level_dice",
    "postprocess_min_lesion_ml", "postprocess_threshold", "val_postprocessed_score",
}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> str:
    """Four 2-channel 32^3 subjects with one bright ellipsoidal lesion each (levels "native" and
    "32", on the same grid)."""
    url = str(tmp_path_factory.mktemp("store") / "tiny.zarr")
    store = StrokeStore.create(url, ["dwi", "adc"], ["native", "32"])
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"))
    affine = cube_affine((32, 32, 32), np.diag([-2.0, 2.0, 2.0, 1.0]), 32)
    for i in range(4):
        centre = rng.integers(10, 22, size=3)[:, None, None, None]
        mask = (((grid - centre) / np.array([5, 4, 3])[:, None, None, None]) ** 2).sum(0) <= 1
        image = rng.normal(0.0, 0.3, size=(2, 32, 32, 32)).astype(np.float32)
        image[0][mask] += 2.0  # bright on DWI
        image[1][mask] -= 1.0  # dark on ADC
        arrays = LevelArrays(image=image, mask=mask.astype(np.uint8), affine=affine)
        store.write_subject(
            f"sub-{i:02d}",
            {"native": arrays, "32": arrays},
            {"norm": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "region": "brain"}},
        )
    return url


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def tiny_config(store: str, tmp: Path, **overrides) -> TrainConfig:
    raw = {
        "name": "tiny",
        "model": {"widths": [4, 8, 16]},
        "data": {"store": store, "level": "32", "patch_size": 16, "sampler": "foreground",
                 "samples_per_volume": 2, "val_fraction": 0.25},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "storage_path": str(tmp / "runs"),
        "val_overlap": 0.0,
        **overrides,
    }
    return TrainConfig.from_dict(raw)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig.from_dict({"optim": {"lr": 1.0, "warmup_epochs": 1, "schedule": "cosine"}}).optim
    lrs = [lr_at(cfg, s, total_steps=20, steps_per_epoch=4) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.05
    poly = cfg.model_copy(update={"schedule": "poly", "warmup_epochs": 0})
    assert lr_at(poly, 0, 10, 5) == 1.0 and lr_at(poly, 9, 10, 5) < 0.2
    # Under a time budget the schedule follows the spent share when it is further along.
    assert lr_at(poly, 0, 10, 5, budget_fraction=1.0) == 0.0
    assert lr_at(poly, 9, 10, 5, budget_fraction=0.1) == lr_at(poly, 9, 10, 5)


def test_training_budget_counts_across_resumes():
    from stroke_ray.budget import TrainingBudget

    assert TrainingBudget(None).fraction() is None and not TrainingBudget(None).exhausted()
    resumed = TrainingBudget(10.0, "process", already_spent=9.999)
    while not resumed.exhausted():
        sum(range(10_000))  # spend a little CPU time
    assert resumed.fraction() == 1.0 and resumed.spent() >= 10.0
    with pytest.raises(ValueError):
        TrainingBudget(0.0)
    with pytest.raises(ValueError):
        TrainingBudget(1.0, clock="gpu")


def test_bad_inputs_fail_before_any_run_or_mlflow_run(tiny_store, tmp_path, mlflow_uri):
    with pytest.raises(StrokeRayError, match="missing.zarr: cannot open the training store"):
        run_training(tiny_config(str(tmp_path / "missing.zarr"), tmp_path, tracking_uri=mlflow_uri))
    bad_level = tiny_config(tiny_store, tmp_path, tracking_uri=mlflow_uri)
    bad_level.data.level = "64"
    with pytest.raises(ConfigError, match="'64' is not in the store"):
        run_training(bad_level)
    bad_patch = tiny_config(tiny_store, tmp_path, tracking_uri=mlflow_uri)
    bad_patch.data.patch_size = 18
    with pytest.raises(ConfigError, match="not a multiple of 4"):
        run_training(bad_patch)
    assert not (tmp_path / "runs").exists()
    assert tracking.find_run(tracking.client_for(mlflow_uri), "stroke-ray", "tiny") is None


def test_train_tracks_and_resumes_without_duplicates(ray_local, tiny_store, tmp_path, mlflow_uri):
    # with augmentation: the loop's augmentation call runs on every step of a real run
    cfg = tiny_config(tiny_store, tmp_path, name="resumable", tracking_uri=mlflow_uri, augment="strong")
    result = run_training(cfg)

    assert REPORTED <= set(result.metrics)
    assert result.metrics["epoch"] == 0
    assert 0.0 <= result.metrics["val_dice"] <= 1.0 and result.metrics["first_step_s"] > 0
    with result.checkpoint.as_directory() as d:
        raw = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True)
        loaded = load_checkpoint(d)
    assert raw["epoch"] == 0 and loaded.modalities == ["dwi", "adc"] and loaded.config.name == "resumable"
    assert raw["postprocessing"]["min_lesion_ml"] == result.metrics["postprocess_min_lesion_ml"]
    assert raw["postprocessing"]["threshold"] == result.metrics["postprocess_threshold"]

    client = tracking.client_for(mlflow_uri)
    run_id = result.mlflow_run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.widths"] == "[4, 8, 16]" and run.data.params["data.level"] == "32"
    assert run.data.params["augment.preset"] == "strong"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "overlays", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "overlays")][0].endswith(".png")
    model_file = model_ref.resolve_checkpoint(f"runs:/{run_id}/model", tracking_uri=mlflow_uri, dst=tmp_path / "dl")
    assert load_checkpoint(model_file).epoch == 0

    # Same name, more epochs, through the CLI: Ray resumes at epoch 1, MLflow reuses the run.
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    from stroke_ray.cli import app

    out = CliRunner().invoke(app, ["train", "--config", str(config_file), "--epochs", "2"])
    assert out.exit_code == 0, out.output
    assert f"mlflow run: {run_id}" in out.output and "epoch=1" in out.output

    history = client.get_metric_history(run_id, "val_dice")
    assert sorted(m.step for m in history) == [0, 1]  # one new epoch, nothing logged twice
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [0, 1]
    assert len(client.search_runs([client.get_experiment_by_name("stroke-ray").experiment_id])) == 1
    assert client.get_run(run_id).data.params["epochs"] == "1"  # params of the run as first logged
    final = model_ref.resolve_checkpoint(f"runs:/{run_id}/model", tracking_uri=mlflow_uri, dst=tmp_path / "dl2")
    assert load_checkpoint(final).epoch == 1
    # Only the checkpoints Ray was told to keep remain on disk, in the run's folder.
    kept = [p for p in (tmp_path / "runs" / "resumable").glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(kept) <= 2


def test_time_budget_stops_at_an_epoch_boundary(ray_local, tiny_store, tmp_path):
    """A spent budget ends training after the epoch in which it ran out, checkpointed and
    reported like any last epoch; an anisotropic patch and deep supervision train too."""
    cfg = tiny_config(tiny_store, tmp_path, name="budgeted", epochs=5, time_budget_s=1e-3,
                      time_budget_clock="process", model={"widths": [4, 8, 16], "deep_supervision": True})
    cfg.data.patch_size = (16, 8, 16)
    result = build_trainer(cfg).fit()
    assert result.metrics["epoch"] == 0 and result.metrics["budget_spent_s"] >= 1e-3
    with result.checkpoint.as_directory() as d:
        loaded = load_checkpoint(d)
    assert loaded.epoch == 0 and not hasattr(loaded.model, "ds_heads") or loaded.model.ds_heads is None


def test_worker_failure_restarts_from_last_checkpoint(ray_local, tiny_store, tmp_path):
    def _fail_once_loop(config: dict) -> None:
        """The real loop, cut short by a crash after its first epoch on the first attempt."""
        marker = Path(config["marker"])
        if not marker.exists():
            marker.touch()
            train_loop_per_worker({**config, "train": {**config["train"], "epochs": 1}})
            raise RuntimeError("simulated worker crash after epoch 0")
        train_loop_per_worker(config)

    cfg = tiny_config(tiny_store, tmp_path, name="flaky", epochs=2, max_failures=1)
    trainer = build_trainer(cfg, train_loop=_fail_once_loop)
    trainer.train_loop_config["marker"] = str(tmp_path / "crashed-once")
    result = trainer.fit()
    assert (tmp_path / "crashed-once").exists()
    assert result.error is None
    assert result.metrics["epoch"] == 1
    with result.checkpoint.as_directory() as d:
        assert load_checkpoint(d).epoch == 1
    # The restarted group resumed: epoch 0 was trained once, epoch 1 once.
    epochs = result.metrics_dataframe["epoch"].tolist()
    assert epochs == [0, 1]
