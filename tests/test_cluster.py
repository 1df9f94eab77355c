"""cluster.yaml passes Ray's own validation, and the CLI commands run against a multi-node cluster."""

from __future__ import annotations

import copy
import json
import os
import re
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

    # The tag names the installed Ray; the digest pins the image behind it.
    assert cluster_config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311-gpu@sha256:")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[tune,train,serve]=={ray.__version__}" in pyproject
    text = CLUSTER_YAML.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET", "AKIA"):
        assert secret not in text
    start = "\n".join(cluster_config["head_start_ray_commands"])
    assert "mlflow server" in start and "--host $PRIVATE_IP" in start and "0.0.0.0 --port 5000" not in start
    assert "--artifacts-destination s3://$STROKE_RAY_BUCKET/mlflow" in start


def _ray_starts(cluster_config) -> dict[str, str]:
    return {kind: next(c for c in cluster_config[f"{kind}_start_ray_commands"] if "ray start" in c)
            for kind in ("head", "worker")}


def test_cluster_yaml_locks_ray_down(cluster_config):
    starts = _ray_starts(cluster_config)
    for kind, command in starts.items():
        # Token authentication and the Serve request guard on every node.
        assert "RAY_AUTH_MODE=token" in command, kind
        assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=stroke_ray.http_guard:proxy_middlewares" in command, kind
        assert command.index("RAY_AUTH_MODE=token") < command.index("ray start"), kind
    # Every node holds the same token, copied from the operator's machine.
    assert cluster_config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    # The dashboard (Jobs API: runs code) listens on the head's loopback only.
    assert "--dashboard-host=127.0.0.1" in starts["head"]
    everything = "\n".join(
        cmd for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands",
                        "worker_start_ray_commands", "initialization_commands") for cmd in cluster_config[key])
    assert "0.0.0.0" not in everything
    # Shells on the nodes (drivers started by hand) use the token too.
    assert any("export RAY_AUTH_MODE=token" in c for c in cluster_config["setup_commands"])


def test_cluster_yaml_mlflow_asks_for_a_password_and_stays_private(cluster_config):
    start = "\n".join(cluster_config["head_start_ray_commands"])
    assert "mlflow server --app-name basic-auth" in start
    assert "MLFLOW_AUTH_CONFIG_PATH=" in start and "--host $PRIVATE_IP" in start
    # MLflow 3's server-side job runners are not started (the variable prefixes the command)
    assert re.search(r"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false(\s+\w+=\S+)*\s+nohup mlflow server", start)
    setup = "\n".join(cluster_config["head_setup_commands"])
    assert "default_permission = NO_PERMISSIONS" in setup and "mlflow-password" in setup
    assert cluster_config["file_mounts"]["/home/ray/.stroke-ray/mlflow-password"] == "~/.stroke-ray/mlflow-password"
    for command in _ray_starts(cluster_config).values():
        assert "MLFLOW_TRACKING_PASSWORD=$(cat ~/.stroke-ray/mlflow-password)" in command


def test_cluster_yaml_network_and_pins(cluster_config):
    types = cluster_config["available_node_types"]
    head = types["head"]["node_config"]
    # A security group of our own on every node: the launcher's default one opens SSH to 0.0.0.0/0.
    assert head["SecurityGroupIds"] == ["<sg-id of stroke-ray-cluster>"]
    for worker in ("gpu-1x", "gpu-4x"):
        (interface,) = types[worker]["node_config"]["NetworkInterfaces"]
        assert interface["AssociatePublicIpAddress"] is False
        assert interface["Groups"] == ["<sg-id of stroke-ray-cluster>"]
        assert "SecurityGroupIds" not in types[worker]["node_config"]
    for rule in cluster_config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r.get("CidrIp") != "0.0.0.0/0" for r in rule.get("IpRanges", []))
    # The documented security group opens SSH to one address, nothing to the world.
    doc = (REPO / "docs" / "security.md").read_text()
    group = doc[doc.index("## The security group"):]
    group = group[:group.index("\n## ", 1)]
    assert "--port 22 --cidr <your-ip>/32" in group and "0.0.0.0/0" not in group.replace("not 0.0.0.0/0", "")
    # Tested versions everywhere; the head's own packages pinned exactly.
    assert any("-c /home/ray/stroke-ray/constraints.txt -e" in c for c in cluster_config["setup_commands"])
    head_pip = next(c for c in cluster_config["head_setup_commands"] if "pip install" in c)
    packages = [w.strip("'\"") for w in head_pip.split() if "==" in w]
    assert packages and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.]*", p) for p in packages)
    assert "-c /home/ray/stroke-ray/constraints.txt" in head_pip
    # ... and never against the constraints, or pip refuses the head's set-up (ResolutionImpossible).
    constrained = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        requirement = line.split(";")[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==")
            constrained[re.sub(r"[-_.]+", "-", name).lower()] = version
    for pin in packages:
        name, version = pin.split("==")
        name = re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()
        assert constrained.get(name, version) == version, f"{pin} against constraints.txt's {constrained[name]}"


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
