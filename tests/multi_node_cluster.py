"""Convert, train, tune and serve on a two-node Ray cluster (run by tests/test_cluster.py).

A separate process: the test session already holds a local Ray (ray_local), and one process
can only be connected to one Ray. Arguments: WORK_DIR DATASET REPO. Prints one line
`RESULT {json}` with what the test checks, and the seconds each step took.
"""

import json
import re
import sys
import time
from pathlib import Path

import httpx
import ray
import yaml
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from stroke_ray.cli import app
from stroke_ray.model_ref import CHAMPION_URI

work, dataset, REPO = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path.insert(0, str(REPO / "tests"))
from helpers import free_port  # noqa: E402 - the tests folder is on the path only now

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
    tuned = cli("tune", "-s", "smoke", "-c", work / "train.yaml",
                "--name", "cluster-sweep", "--storage", work / "runs", "--num-samples", 1,
                "--tracking-uri", config["tracking_uri"], "--address", address)
    lap("tune")
    out["registered"] = re.search(r"registered: (\S+)", tuned).group(1)
    out["model_ref"] = CHAMPION_URI

    from stroke_ray.service import start_server, stop_server

    url = start_server(out["model_ref"], port=free_port(), address=address, cpus_per_replica=0.5,
                       tracking_uri=config["tracking_uri"])
    out["healthz"] = httpx.get(f"{url}/healthz", timeout=60).json()
    lap("serve")
    stop_server()
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
