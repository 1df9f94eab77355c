"""Shared fixtures: the real ISLES'22 sample case, a local Ray, small synthetic data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, stop_process

os.environ.setdefault("RAY_ACCEPT_CLOUD_STORAGE_CONFIG", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Serve proxies of the session's Ray run the request guard, as `stroke-ray serve`'s do.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "stroke_ray.http_guard:proxy_middlewares")

REPO = Path(__file__).resolve().parents[1]
ISLES_SAMPLE = (REPO.parent / "shared" / "data" / "isles22-sample").resolve()


def pytest_collection_modifyitems(config, items):
    """Every test that starts the session's local Ray is slow, marked or not.

    Starting Ray costs ~10 s on a loaded 2-core machine; `pytest -m "not slow"` stays a
    quick loop only if no test in it starts Ray. Tests that start Ray Train, Tune, Serve or
    a cluster carry `@pytest.mark.slow` themselves as well.
    """
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def isles_sample() -> Path:
    """The real ISLES'22 case beside the repository (read-only)."""
    if not (ISLES_SAMPLE / "rawdata").is_dir():
        pytest.fail(f"{ISLES_SAMPLE}: the ISLES'22 sample case is missing (../shared beside the repo)")
    return ISLES_SAMPLE


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """Four synthetic ISLES'22-layout cases (deterministic)."""
    from stroke_ray.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth") / "isles_synth"
    generate_dataset(root, num_cases=4, layout="isles22", seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def atlas_dataset(tmp_path_factory) -> Path:
    """One synthetic ATLAS R2.0 case (sub-synth0001, seed 3), written by `stroke-ray synth`.

    A whole 1 mm MNI152 volume takes about a minute on a loaded 2-core machine: the tests
    that need an ATLAS case share this one.
    """
    from typer.testing import CliRunner

    from stroke_ray.cli import app

    out = tmp_path_factory.mktemp("atlas") / "atlas"
    result = CliRunner().invoke(app, ["synth", "-o", str(out), "-n", "1", "--layout", "atlas", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def synth_store(synth_dataset, tmp_path_factory, ray_local) -> str:
    """The synthetic cases converted to a Zarr store with a 32^3 training level."""
    from stroke_ray.ingest import convert_dataset

    out = str(tmp_path_factory.mktemp("store") / "synth.zarr")
    report = convert_dataset(str(synth_dataset), out, levels=[32], progress=False)
    assert report.converted == 4, report.summary()
    return out


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """One MLflow sqlite database with its schema made (migrations take seconds of CPU)."""
    from stroke_ray.tracking import client_for

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client_for(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def new_mlflow_uri(_mlflow_template):
    """`new_mlflow_uri(folder)`: a fresh, empty MLflow store at folder/mlflow.db (a copy of
    the template), as a `sqlite:///` URI. Artifacts go beside it, as for any sqlite store."""
    import shutil

    def make(folder: Path) -> str:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


@dataclass
class S3Server:
    """A local S3-compatible server: its endpoint, a bucket, and the environment that points
    boto3, s3fs (Zarr) and pyarrow (Ray Train/Tune) at it."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (a free port), with one bucket; stopped at the end.

    The credentials are dummies; `AWS_ENDPOINT_URL` is what botocore (boto3, s3fs) and
    pyarrow's S3 filesystem read to reach an S3-compatible endpoint. They are set in this
    process for the session and passed to child processes by the tests that start them.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto S3 server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="stroke-ray-test")
    try:
        yield S3Server(endpoint, "stroke-ray-test", env)
    finally:
        stop_process(proc, timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
