"""Object storage for real: everything against a local S3-compatible server (moto, 127.0.0.1).

The quick tests read and write through each library's own S3 client: pyarrow (what Ray
Train and Tune use for `storage_path`, and `locations` for a sweep's own files), s3fs
(Zarr stores). The end-to-end test runs the real CLI in child processes, which start their
own local Ray with the server's environment, so Tune trials, Train workers and Serve
replicas reach the same server: convert -> tune -> resume -> predict -> serve, with the
store, Tune state, Train checkpoints, `best/`, the report and MLflow's artifacts on S3.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml
from helpers import case_files, free_port, stop_process

from stroke_ray.locations import found, list_names, read_bytes, size_of, write_bytes, write_text
from stroke_ray.model_ref import PYFUNC_CHECKPOINT
from stroke_ray.sampling import PatchDataset
from stroke_ray.store import LevelArrays, StrokeStore

# A server process and S3 round trips (and, end to end, Ray): the whole module is slow.
pytestmark = pytest.mark.slow


def s3_keys(s3_server, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix,
                                      **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def test_locations_read_and_write_objects_through_pyarrow(s3_server):
    base = s3_server.url("locations")
    write_text(f"{base}/sweep/report.md", "# report\n")
    write_bytes(f"{base}/sweep/best/checkpoint.pt", b"\x00weights")
    assert read_bytes(f"{base}/sweep/report.md") == b"# report\n"
    assert list_names(f"{base}/sweep") == ["best", "report.md"]
    assert found(f"{base}/sweep/best/checkpoint.pt") and not found(f"{base}/sweep/nothing")
    assert size_of(f"{base}/sweep/best/checkpoint.pt") == 8 and size_of(f"{base}/nothing") is None
    assert "locations/sweep/report.md" in s3_keys(s3_server, "locations/")


def test_store_on_s3_serves_the_patch_stream(s3_server):
    url = s3_server.url("stores", "tiny.zarr")
    store = StrokeStore.create(url, ["dwi", "adc"], ["16"])
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 16, 16, 16)).astype(np.float32)
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[4:9, 5:10, 6:11] = 1
    for subject in ("sub-1", "sub-2"):
        store.write_subject(subject, {"16": LevelArrays(image, mask, np.eye(4))},
                            {"norm": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}})
    assert "stores/tiny.zarr/zarr.json" in s3_keys(s3_server, "stores/tiny.zarr/")
    reopened = StrokeStore.open(url)
    assert reopened.subjects() == ["sub-1", "sub-2"]
    np.testing.assert_array_equal(reopened.image("sub-2", "16")[...], image)
    for cache_bytes in (0, 2**20):  # direct chunk reads and the cache both read from S3
        ds = PatchDataset(url, ["sub-1", "sub-2"], "16", 8, sampler="foreground",
                          foreground_fraction=1.0, cache_bytes=cache_bytes)
        item = next(iter(ds))
        assert item["image"].shape == (2, 8, 8, 8) and item["mask"].sum() > 0


# --------------------------------------------------------------------------- end to end


def _cli(args: list[str], env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "stroke_ray", *args], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"stroke-ray {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{url} never answered:\n{log.read_text()[-4000:]}")
        time.sleep(1.0)


@pytest.fixture
def mlflow_server(s3_server, tmp_path):
    """A real MLflow tracking server on 127.0.0.1 whose artifacts go to the S3 bucket."""
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    # MLflow 3.17's server also starts a job executor (a pool of worker processes for its
    # GenAI jobs): off, it starts in seconds instead of minutes on two busy cores.
    env = {**os.environ, **s3_server.env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--artifacts-destination", s3_server.url("mlflow")],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", proc, log)
    yield url
    stop_process(proc, timeout=20)


def test_convert_tune_resume_predict_serve_all_on_s3(s3_server, mlflow_server, synth_dataset, isles_sample,
                                                      tmp_path):
    env = {**os.environ, **s3_server.env, "TQDM_DISABLE": "1", "RAY_ACCEPT_CLOUD_STORAGE_CONFIG": "1"}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "work"
    work.mkdir()
    store, runs = s3_server.url("stores", "synth.zarr"), s3_server.url("runs")

    _cli(["convert", str(synth_dataset), "-o", store, "--levels", "32", "--spacing", "", "--in-process"], env, work)
    assert "stores/synth.zarr/zarr.json" in s3_keys(s3_server, "stores/synth.zarr/")

    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"widths": [4, 8], "deep_supervision": False},
        "data": {"store": store, "level": "32", "patch_size": 16, "samples_per_volume": 1},
        "epochs": 1, "steps_per_epoch": 1, "batch_size": 1, "val_max_subjects": 1, "val_overlap": 0.0,
        "experiment": "s3",
    }))
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "s3-smoke", "metric": "val_dice", "mode": "max", "num_samples": 1,
        "parameters": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
    }))
    tune = ["tune", "-s", str(space), "-c", str(config), "--storage", runs, "--tracking-uri", mlflow_server,
            "--cpus-per-trial", "0.5"]
    _cli(tune, env, work)
    first = {k for k in s3_keys(s3_server, "runs/s3-smoke/") if k.endswith("result.json")}
    assert len(first) == 1
    # Resume from S3 alone (nothing local) with one more trial: the finished one is not re-run.
    _cli([*tune, "--resume", "--num-samples", "2"], env, work)
    keys = s3_keys(s3_server, "runs/s3-smoke/")
    assert len([k for k in keys if k.endswith("result.json")]) == 2
    for expected in ("runs/s3-smoke/best/checkpoint.pt", "runs/s3-smoke/best/config.yaml",
                     "runs/s3-smoke/report.md"):
        assert expected in keys
    assert any(k.startswith("runs/s3-smoke/experiment_state-") for k in keys)
    assert any(k.startswith("runs/s3-smoke/train/") and k.endswith("/checkpoint.pt") for k in keys)
    report = read_bytes(f"{runs}/s3-smoke/report.md").decode()
    assert report.count("| TERMINATED |") == 2
    assert not any(p.name.startswith("s3") or p.name == "runs" for p in work.iterdir())  # nothing local
    assert any(k.endswith(f"model/{PYFUNC_CHECKPOINT}") for k in s3_keys(s3_server, "mlflow/"))

    champion = "models:/stroke-ray-segmenter@champion"
    out = work / "predictions"
    _cli(["predict", "-i", str(isles_sample), "-o", str(out), "-m", champion,
          "--tracking-uri", mlflow_server, "--device", "cpu"], env, work)
    table = json.loads((out / "predictions.json").read_text())
    assert table["model_version"] == "stroke-ray-segmenter/v1"
    assert (out / "sub-strokecase0009_mask.nii.gz").is_file()

    port = free_port()
    log = work / "serve.log"
    with open(log, "wb") as sink:
        serve = subprocess.Popen(
            [sys.executable, "-m", "stroke_ray", "serve", "-m", champion, "--port", str(port),
             "--tracking-uri", mlflow_server, "--cpus-per-replica", "0.5"],
            env=env, cwd=work, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", serve, log)
        uploads = {m: (p.name, p.read_bytes()) for m, p in case_files(isles_sample).items()}
        r = httpx.post(f"http://127.0.0.1:{port}/predict", files=uploads, timeout=300)
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == "stroke-ray-segmenter/v1"
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
        assert mask.shape == nib.load(case_files(isles_sample)["dwi"]).shape
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            serve.kill()
