"""cluster.yaml passes Ray's own validation, and the CLI commands run against a multi-node cluster."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stroke_ray.ray_compat import validate_cluster_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation(cluster_config):
    # What `ray up` does before it contacts AWS: fill defaults, merge, check docker, validate.
    prepared = validate_cluster_config(copy.deepcopy(cluster_config))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    types = prepared["available_node_types"]
    assert types["head"]["node_config"]["InstanceType"].startswith("m5.")
    assert types["gpu-1x"]["node_config"]["InstanceType"] == "g5.xlarge"
    assert types["gpu-4x"]["node_config"]["InstanceType"] == "g5.12xlarge"
    for worker in ("gpu-1x", "gpu-4x"):
        assert types[worker]["min_workers"] == 0
        assert types[worker]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "IamInstanceProfile" in types["head"]["node_config"]


def test_cluster_yaml_pins_the_installed_ray_and_holds_no_secrets(cluster_config):
    import ray

    assert cluster_config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[tune,train,serve]=={ray.__version__}" in pyproject
    text = CLUSTER_YAML.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET", "AKIA"):
        assert secret not in text
    start = "\n".join(cluster_config["head_start_ray_commands"])
    assert "mlflow server" in start and "--host $PRIVATE_IP" in start and "0.0.0.0 --port 5000" not in start
    assert "--artifacts-destination s3://$STROKE_RAY_BUCKET/mlflow" in start


def test_invalid_cluster_yaml_is_rejected(cluster_config):
    # The validation above must be able to fail: a misspelt field is refused by the schema.
    import jsonschema

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu-1x"]["min_wrokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_config(broken)


# Run as a separate process: the test session already holds a local Ray (ray_local), and one
# process can only be connected to one Ray.
MULTI_NODE_SCRIPT = REPO / "tests" / "multi_node_cluster.py"


@pytest.mark.slow
def test_convert_train_tune_serve_on_a_two_node_cluster(tmp_path, synth_dataset):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TQDM_DISABLE"] = "1"
    proc = subprocess.run([sys.executable, str(MULTI_NODE_SCRIPT), str(tmp_path), str(synth_dataset), str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=400)
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_lines[-1][len("RESULT "):])
    print("multi-node steps (s):", result["seconds"])
    assert result["nodes"] == 2
    assert result["registered"] == result["model_ref"]  # the sweep's best became the champion
    assert (tmp_path / "runs" / "cluster-sweep" / "best" / "checkpoint.pt").is_file()
    assert result["healthz"]["status"] == "ok"
    assert result["healthz"]["model"] == result["model_ref"]
    assert (tmp_path / "store.zarr").is_dir() and (tmp_path / "mlflow.db").is_file()
