"""The logged model is an MLflow model: pyfunc load + predict, `mlflow models serve`, old layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers import case_files, free_port, make_checkpoint, stop_process

from stroke_ray import model_ref, tracking
from stroke_ray.predict import predict_dataset


@pytest.fixture(scope="module")
def registered(tmp_path_factory, isles_sample, new_mlflow_uri):
    """A checkpoint logged the new way, registered as the champion, and stroke-ray's own masks."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = new_mlflow_uri(root)
    checkpoint = make_checkpoint(root / "ckpt", bias=None)
    client = tracking.client_for(uri)
    run_id = tracking.get_or_create_run(client, "pyfunc-test", "trained")
    version = model_ref.register_champion(model_ref.log_model(client, run_id, checkpoint), client=client)
    report = predict_dataset(case_files(isles_sample), checkpoint, root / "predicted", progress=False)
    mask = np.asarray(nib.load(root / "predicted" / report.rows[0]["mask_file"]).dataobj)
    return dict(uri=uri, client=client, run_id=run_id, version=version, checkpoint=checkpoint,
                mask=mask, row=report.rows[0], root=root)


@pytest.mark.slow
def test_experiment_opens_on_training_runs(registered):
    exp = registered["client"].get_experiment_by_name("pyfunc-test")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


@pytest.mark.slow
def test_champion_loads_with_mlflow_pyfunc_and_predicts_like_stroke_ray(registered, isles_sample, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registered["uri"])
    model = mlflow.pyfunc.load_model(model_ref.CHAMPION_URI)
    assert [c.name for c in model.metadata.get_input_schema().inputs][:3] == ["dwi", "adc", "flair"]
    files = {m: str(p) for m, p in case_files(isles_sample).items()}
    out = model.predict(pd.DataFrame([files]))
    assert list(out.columns) == ["mask", "volume_ml", "lesion_count"]
    np.testing.assert_array_equal(out["mask"][0], registered["mask"])
    assert out["volume_ml"][0] == pytest.approx(registered["row"]["volume_ml"])
    assert out["lesion_count"][0] == registered["row"]["lesion_count"]

    # Arrays instead of paths (with the reference's affine): the same mask.
    arrays = {m: np.asarray(nib.load(p).dataobj, dtype=np.float32) for m, p in files.items() if m != "flair"}
    mixed = model.predict(pd.DataFrame([{**arrays, "flair": files["flair"], "affine": nib.load(files["dwi"]).affine}]))
    np.testing.assert_array_equal(mixed["mask"][0], registered["mask"])


@pytest.mark.slow
def test_model_logged_the_old_way_still_resolves(registered, isles_sample, tmp_path):
    """Runs that logged a bare model/checkpoint.pt keep working for predict and serve."""
    client = registered["client"]
    old_run = tracking.get_or_create_run(client, "pyfunc-test", "old-layout")
    client.log_artifact(old_run, str(registered["checkpoint"]), "model")
    local = model_ref.resolve_checkpoint(f"runs:/{old_run}/model", tracking_uri=registered["uri"], dst=tmp_path / "old")
    assert local.name == "checkpoint.pt" and local.parent.name == "model"
    new = model_ref.resolve_checkpoint(model_ref.CHAMPION_URI, tracking_uri=registered["uri"], dst=tmp_path / "new")
    assert new.read_bytes() == local.read_bytes() == registered["checkpoint"].read_bytes()
    report = predict_dataset(case_files(isles_sample), f"runs:/{old_run}/model", tmp_path / "out",
                             tracking_uri=registered["uri"], progress=False)
    assert report.rows[0]["volume_ml"] == registered["row"]["volume_ml"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_one_real_request(registered, isles_sample, tmp_path):
    port = free_port()
    env_uri = {"MLFLOW_TRACKING_URI": registered["uri"], "MLFLOW_REGISTRY_URI": registered["uri"]}

    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_ref.CHAMPION_URI,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        # The venv's bin on PATH, as in an activated venv: MLflow starts `uvicorn` from there.
        env={**os.environ, **env_uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        else:
            pytest.fail("mlflow models serve did not answer /ping: " + (tmp_path / "serve.log").read_text()[-3000:])
        files = {m: str(p) for m, p in case_files(isles_sample).items()}
        r = httpx.post(f"{url}/invocations", json={"dataframe_records": [files]}, timeout=300)
        assert r.status_code == 200, r.text[:2000]
        prediction = json.loads(r.text)["predictions"][0]
        assert prediction["volume_ml"] == pytest.approx(registered["row"]["volume_ml"])
        assert prediction["lesion_count"] == registered["row"]["lesion_count"]
        np.testing.assert_array_equal(np.asarray(prediction["mask"], dtype=np.uint8), registered["mask"])
    finally:
        stop_process(server, timeout=30)
        log.close()
