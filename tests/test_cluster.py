"""cluster.yaml passes Ray's own validation, and the CLI commands run against a multi-node cluster."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it contacts AWS: fill defaults, merge, check docker, validate.
    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
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
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu-1x"]["min_wrokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


# The driver of this script is a separate process: the test session already holds a local
# Ray (ray_local), and one process can only be connected to one Ray.
MULTI_NODE_SCRIPT = textwrap.dedent(
    r'''
    import json, re, socket, sys, time
    from pathlib import Path

    import httpx, ray, yaml
    from ray.cluster_utils import Cluster
    from typer.testing import CliRunner

    from stroke_ray.cli import app

    work, dataset, REPO = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    clock = time.perf_counter()
    seconds = {}

    def lap(step):
        global clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 1)
        clock = now

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    address = cluster.address
    runner = CliRunner()
    out = {"address": address, "seconds": seconds}
    lap("cluster")

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args])
        if result.exit_code != 0:
            raise SystemExit(f"stroke-ray {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}")
        return result.output

    try:
        cli("convert", dataset, "-o", work / "store.zarr", "--levels", 32, "--address", address)
        lap("convert")
        out["nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
        config = {
            "name": "cluster-smoke",
            "model": {"widths": [4, 8, 16]},
            "data": {"store": str(work / "store.zarr"), "level": "32", "patch_size": 32,
                     "samples_per_volume": 2, "val_fraction": 0.25},
            "epochs": 1, "steps_per_epoch": 2, "batch_size": 1, "num_workers": 1,
            "use_gpu": False, "amp": False, "val_max_subjects": 1,
            "storage_path": str(work / "runs"), "tracking_uri": f"sqlite:///{work}/mlflow.db",
        }
        (work / "train.yaml").write_text(yaml.safe_dump(config))
        trained = cli("train", "-c", work / "train.yaml", "--address", address)
        lap("train")
        out["train_run"] = re.search(r"mlflow run: (\w+)", trained).group(1)
        tuned = cli("tune", "-s", REPO / "search_spaces" / "smoke.yaml", "-c", work / "train.yaml",
                    "--name", "cluster-sweep", "--storage", work / "runs", "--num-samples", 1,
                    "--tracking-uri", config["tracking_uri"], "--address", address)
        lap("tune")
        out["registered"] = re.search(r"registered: (\S+)", tuned).group(1)
        out["model_ref"] = "models:/stroke-ray-segmenter@champion"

        from stroke_ray.serving import start_server, stop_server

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = start_server(out["model_ref"], port=port, address=address, cpus_per_replica=0.5,
                           tracking_uri=config["tracking_uri"])
        out["healthz"] = httpx.get(f"{url}/healthz", timeout=60).json()
        lap("serve")
        stop_server()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
    '''
)


def test_convert_train_tune_serve_on_a_two_node_cluster(tmp_path, synth_dataset):
    script = tmp_path / "multi_node.py"
    script.write_text(MULTI_NODE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TQDM_DISABLE"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(synth_dataset), str(REPO)], cwd=tmp_path, env=env,
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
