"""Per-epoch time split of a small Ray Train run: data wait vs compute vs validation.

    .venv/bin/python benchmarks/bench_train.py [--epochs 3] [--steps 10] [--size 64] [--patch 32]

Builds a small synthetic store (blob lesions, 2 channels), trains `--epochs` epochs on one
local Ray Train worker and prints, per epoch, the loop's own timings. Baseline measured in
the same run and process tree: the same model's forward/backward/step on random tensors in
a plain torch loop (no Ray, no data loading), so `step ratio` = Ray-worker step time /
plain step time, and the data and validation shares are relative to the epoch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_store(url: str, n: int, size: int) -> None:
    from stroke_ray.grid import cube_affine
    from stroke_ray.store import LevelArrays, StrokeStore

    store = StrokeStore.create(url, ["dwi", "adc"], [str(size)])
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    affine = cube_affine((size,) * 3, np.diag([-2.0, 2.0, 2.0, 1.0]), size)
    for i in range(n):
        centre = rng.integers(size // 4, 3 * size // 4, size=3)[:, None, None, None]
        radii = np.array([size / 6, size / 8, size / 10])[:, None, None, None]
        mask = (((grid - centre) / radii) ** 2).sum(0) <= 1
        image = rng.normal(0.0, 0.3, size=(2, size, size, size)).astype(np.float32)
        image[0][mask] += 2.0
        image[1][mask] -= 1.0
        store.write_subject(
            f"sub-{i:02d}",
            {str(size): LevelArrays(image=image, mask=mask.astype(np.uint8), affine=affine)},
            {"norm": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "region": "brain"}},
        )


def plain_step_time(cfg, steps: int) -> float:
    """Seconds per optimizer step of the same model/loss/batch in a bare torch loop."""
    from stroke_ray.losses import build_loss
    from stroke_ray.models import build_model

    torch.set_num_threads(cfg.cpus_per_worker)  # what Ray gives one worker (OMP_NUM_THREADS)
    model = build_model(cfg.model, in_channels=2)
    loss_fn = build_loss(cfg.loss, cfg.model.out_channels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = cfg.data.patch_size
    x = torch.randn(cfg.batch_size, 2, n, n, n)
    y = (torch.rand(cfg.batch_size, 1, n, n, n) > 0.9).float()
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))  # first step warms up allocators


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--subjects", type=int, default=6)
    args = ap.parse_args()

    import ray

    from stroke_ray.config import TrainConfig
    from stroke_ray.train import build_trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    url = str(tmp / "bench.zarr")
    make_store(url, args.subjects, args.size)
    cfg = TrainConfig.from_dict({
        "name": "bench",
        "model": {"widths": [8, 16, 32, 64]},
        "data": {"store": url, "level": str(args.size), "patch_size": args.patch,
                 "sampler": "threshold", "samples_per_volume": 4, "val_fraction": 0.34},
        "epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": 2,
        "storage_path": str(tmp / "runs"), "val_overlap": 0.25,
        "checkpoints_to_keep": args.epochs,  # Result.metrics_dataframe lists kept checkpoints only
    })

    # Baseline before and after the Ray run: the machine is shared, so bracket the measurement.
    base_before = plain_step_time(cfg, args.steps)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address=os.environ.get("RAY_ADDRESS", "local"))
    t_ray = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = build_trainer(cfg).fit()
    t_fit = time.perf_counter() - t0
    ray.shutdown()
    base_after = plain_step_time(cfg, args.steps)
    base = (base_before + base_after) / 2

    from stroke_ray.splits import split_subjects
    from stroke_ray.store import StrokeStore

    n_val = len(split_subjects(StrokeStore.open(url).subjects(), cfg.data.val_fraction, cfg.data.split_seed)[1])
    df = result.metrics_dataframe
    print(f"store {args.subjects} x 2x{args.size}^3, patch {args.patch}, batch 2, widths [8,16,32,64], "
          f"{args.steps} steps/epoch, val on {n_val} whole volumes")
    print(f"ray.init {t_ray:.1f} s, fit() {t_fit:.1f} s, first step {df['first_step_s'].iloc[0]:.1f} s after worker start")
    print(f"baseline plain-torch step (same model and batch, 1 thread like the worker): "
          f"{base_before * 1000:.0f} ms before, {base_after * 1000:.0f} ms after the Ray run; ratio uses the mean")
    print("epoch  epoch_s  data_ms/step  step_ms/step  val_s  | data share  step share  val share  step ratio")
    for _, r in df.iterrows():
        e = r["epoch_time_s"]
        data, step, val = r["data_time_s"] * args.steps, r["step_time_s"] * args.steps, r["val_time_s"]
        print(f"{int(r['epoch']):5d}  {e:7.2f}  {r['data_time_s'] * 1000:12.0f}  {r['step_time_s'] * 1000:12.0f}  {val:5.2f}  |"
              f"  {data / e:10.2f}  {step / e:10.2f}  {val / e:9.2f}  {r['step_time_s'] / base:10.2f}")


if __name__ == "__main__":
    main()
