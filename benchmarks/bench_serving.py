"""Cost of serving over HTTP: /predict on Ray Serve against the same work done in-process.

Baseline (measured in the same run, interleaved with the served requests): read the three
real ISLES'22 files, `ingest.load_case`, `Segmenter.predict`, and encode the mask as
.nii.gz, all in this process with the same number of torch threads as the replica's CPUs.
Served: the same files POSTed as multipart to `/predict` on a local Serve instance (mask
returned as .nii.gz, or JSON). The ratio served/direct is the price of the HTTP path
(upload, multipart parsing, validation, temp files, the proxy hop).

    .venv/bin/python benchmarks/bench_serving.py [--repeats 5] [--level 64] [--widths 8,16,32,64]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "isles22-sample"
SUBJECT, SES = "sub-strokecase0009", "ses-0001"
MODALITIES = ["dwi", "adc", "flair"]


def make_checkpoint(directory: Path, level: str, widths: list[int]) -> Path:
    import torch

    from stroke_ray.checkpoint import save_checkpoint
    from stroke_ray.config import DataConfig, ModelConfig, TrainConfig
    from stroke_ray.models import build_model

    torch.manual_seed(0)
    patch = 64 if level == "native" else int(level)
    cfg = TrainConfig(model=ModelConfig(widths=widths), data=DataConfig(level=level, patch_size=patch), val_overlap=0.25)
    model = build_model(cfg.model, in_channels=len(MODALITIES))
    return save_checkpoint(directory, model=model, epoch=0, config=cfg, modalities=MODALITIES, normalization="zscore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--level", default="64")
    parser.add_argument("--widths", default="8,16,32,64")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the replica = torch threads of the baseline")
    args = parser.parse_args()

    import httpx
    import nibabel as nib
    import numpy as np
    import ray
    import torch

    from stroke_ray.ingest import load_case
    from stroke_ray.predict import like_reference, nifti_bytes
    from stroke_ray.segmenter import Segmenter
    from stroke_ray.service import start_server, stop_server

    files = {m: SAMPLE / "rawdata" / SUBJECT / SES / f"{SUBJECT}_{SES}_{m}.nii.gz" for m in MODALITIES}
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    ckpt = make_checkpoint(tmp / "ckpt", args.level, [int(w) for w in args.widths.split(",")])
    torch.set_num_threads(args.cpus)
    segmenter = Segmenter.load(ckpt, device="cpu")

    def direct() -> bytes:
        case = load_case(files, subject="bench")
        prediction = segmenter.predict(case)
        return nifti_bytes(like_reference(prediction.mask, nib.load(str(files["dwi"])), np.uint8))

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    url = start_server(ckpt, port=port, cpus_per_replica=args.cpus)
    startup = time.perf_counter() - t0
    uploads = {m: (p.name, p.read_bytes()) for m, p in files.items()}
    timings: dict[str, list[float]] = {"direct": [], "http nifti": [], "http json": []}
    with httpx.Client(base_url=url, timeout=600) as client:
        # One warm-up of each path (model pages, lazy imports), then interleaved rounds.
        direct()
        assert client.post("/predict", files=uploads).status_code == 200
        for _ in range(args.repeats):
            t = time.perf_counter()
            direct()
            timings["direct"].append(time.perf_counter() - t)
            t = time.perf_counter()
            r = client.post("/predict", files=uploads)
            timings["http nifti"].append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            t = time.perf_counter()
            r = client.post("/predict", params={"format": "json"}, files=uploads)
            timings["http json"].append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        t = time.perf_counter()
        for _ in range(20):
            client.get("/healthz")
        health_ms = (time.perf_counter() - t) / 20 * 1000
    stop_server()
    ray.shutdown()

    base = statistics.median(timings["direct"])
    print(f"level {args.level}, widths {args.widths}, {args.cpus} CPU(s), {args.repeats} interleaved rounds; "
          f"upload {sum(len(d) for _, d in uploads.values()) / 2**20:.1f} MiB")
    print("| path | median s | x direct |")
    print("|---|---:|---:|")
    for name, values in timings.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {med / base:.2f} |")
    print(f"server start-up (deploy + replica load) {startup:.1f} s; GET /healthz {health_ms:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
