"""k-fold cross-validation on real local Ray Train and MLflow: folds, out-of-fold scores, ensemble."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stroke_ray import model_ref, tracking
from stroke_ray.checkpoint import load_checkpoint
from stroke_ray.config import TrainConfig
from stroke_ray.crossval import cross_validate
from stroke_ray.metrics import METRIC_KEYS
from stroke_ray.splits import fold_splits
from stroke_ray.store import StrokeStore

pytestmark = pytest.mark.slow


def tiny(store: str, tmp_path, uri: str, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({
        "name": "cv", "experiment": "cv-test",
        "model": {"widths": [4, 8]},
        "data": {"store": store, "level": "32", "patch_size": 16, "sampler": "foreground",
                 "samples_per_volume": 2},
        "epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "val_overlap": 0.0,
        "storage_path": str(tmp_path / "runs"), "tracking_uri": uri,
        **overrides,
    })


def test_two_fold_cross_validation(ray_local, synth_store, tmp_path, new_mlflow_uri):
    cfg = tiny(synth_store, tmp_path, new_mlflow_uri(tmp_path / "mlflow"))
    result = cross_validate(cfg, 2)
    subjects = StrokeStore.open(synth_store).subjects()
    folds = fold_splits(subjects, 2, cfg.data.split_seed)

    # Every subject predicted once, by the fold model that did not train on it.
    assert sorted(r["subject"] for r in result.rows) == subjects
    for row in result.rows:
        assert row["subject"] in folds[row["fold"]]
    # The out-of-fold pass is the fold's own final validation: same model, same path.
    for fold in result.folds:
        mine = [r for r in result.rows if r["fold"] == fold.fold]
        assert [r["subject"] for r in mine] == fold.val_subjects == folds[fold.fold]
        assert fold.metrics["val_dice"] == pytest.approx(sum(r["dice"] for r in mine) / len(mine), abs=1e-9)
    for key in METRIC_KEYS:
        mean = sum(r[key] for r in result.rows) / len(result.rows)
        assert result.oof_metrics[f"oof_{key}"] == pytest.approx(mean, abs=1e-9)
    assert "oof_level_dice" in result.oof_metrics

    # MLflow: one parent run (kind cv) with one nested run per fold, all finished.
    client = tracking.client_for(cfg.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["stroke_ray.kind"] == "cv"
    assert parent.data.metrics["oof_dice"] == pytest.approx(result.oof_metrics["oof_dice"])
    exp = client.get_experiment_by_name("cv-test").experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stroke_ray.run_name"] for r in children) == ["cv-fold0", "cv-fold1"]
    assert all(r.info.status == "FINISHED" and "val_dice" in r.data.metrics for r in children)
    assert {r.data.params["data.fold"] for r in children} == {"0", "1"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"oof.csv", "folds.json", "model"} <= artifacts
    with open(client.download_artifacts(parent.info.run_id, "oof.csv", str(tmp_path))) as fh:
        table = list(csv.DictReader(fh))
    assert sorted(r["subject"] for r in table) == subjects

    # The ensemble: one weights-only file, two members, postprocessing chosen out of fold.
    raw = torch.load(result.ensemble, map_location="cpu", weights_only=True)
    assert raw["ensemble"]["members"] == 2
    loaded = load_checkpoint(model_ref.resolve_checkpoint(result.model_uri, cfg.tracking_uri, tmp_path / "dl"))
    assert loaded.members == 2
    assert loaded.postprocessing.min_lesion_ml == result.oof_metrics["postprocess_min_lesion_ml"]


def test_too_many_folds_fail_before_any_run(synth_store, tmp_path, new_mlflow_uri):
    from stroke_ray.errors import ConfigError

    cfg = tiny(synth_store, tmp_path, new_mlflow_uri(tmp_path / "mlflow"))
    with pytest.raises(ConfigError, match="--folds: 5 folds need 2 <= k <= the number of subjects"):
        cross_validate(cfg, 5)
    assert tracking.find_run(tracking.client_for(cfg.tracking_uri), "cv-test", "cv") is None


def test_sweep_retrains_the_best_configuration_on_folds(ray_local, synth_store, tmp_path, new_mlflow_uri):
    from stroke_ray.cli import app

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "tiny", "metric": "val_dice", "mode": "max", "num_samples": 1, "max_epochs": 1,
        "grace_period": 1, "fixed": {"data.samples_per_volume": 2, "val_overlap": 0.0, "model.widths": [4, 8],
                                     "data.patch_size": 16},
        "parameters": {"optim.lr": {"loguniform": [1e-3, 1e-2]}},
    }))
    uri = new_mlflow_uri(tmp_path / "mlflow")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny(synth_store, tmp_path, uri).model_dump(mode="json")))
    out = CliRunner().invoke(app, ["tune", "-s", str(space), "-c", str(base), "--storage", str(tmp_path / "sweeps"),
                                   "--tracking-uri", uri, "--retrain-folds", "2"])
    assert out.exit_code == 0, out.output
    assert "cross-validation tiny-cv2: 2 folds" in out.output
    client = tracking.client_for(uri)
    champion = client.get_model_version_by_alias("stroke-ray-segmenter", "champion")
    cv_run = client.get_run(champion.run_id)
    assert cv_run.data.tags["stroke_ray.kind"] == "cv" and cv_run.data.tags["stroke_ray.run_name"] == "tiny-cv2"
    sweep_run = client.get_run(cv_run.data.tags["mlflow.parentRunId"])
    assert sweep_run.data.tags["stroke_ray.kind"] == "sweep"
    # Only the ensemble was registered, not the sweep's single best trial.
    assert [v.version for v in client.search_model_versions("name='stroke-ray-segmenter'")] == [champion.version]
    model = load_checkpoint(model_ref.resolve_checkpoint("models:/stroke-ray-segmenter@champion", uri, tmp_path / "c"))
    assert model.members == 2 and model.config.optim.lr == pytest.approx(
        float(client.get_run(sweep_run.data.tags["stroke_ray.best_run_id"]).data.params["optim.lr"]))
