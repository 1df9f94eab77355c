"""Where a sweep's wall time goes: training steps vs per-trial start-up and bookkeeping.

    .venv/bin/python benchmarks/bench_sweep.py                       # smoke space, synthetic store
    .venv/bin/python benchmarks/bench_sweep.py --space default \
        --store data/isles.zarr --num-samples 2 --epochs 2 --steps 10   # a short default-space run

For every trial it reads the metrics the train loop reports each epoch (`step_time_s`,
`epoch_time_s`, `first_step_s`) and Tune's `time_total_s` (since the trial started):

    overhead_s      trial start -> its first epoch begins (driver, Train controller and worker
                    start-up, imports, data and model set-up), split into
      driver_s        the trial's driver: actor start, imports, its MLflow run, building the trainer
      workers_s       trainer built -> train loop running (Train controller, worker processes,
                      process group)
      imports_s, store_s, model_s, tracking_s   the train loop's own set-up (`startup_*` metrics)
    first_batch_s   the first batch (inside the first epoch)
    in_steps        share of the trial's wall time spent in optimizer steps
    sweep in_steps  share of the whole sweep's wall time spent in optimizer steps

`--trial-minutes M` gives every trial a wall-clock training budget of M minutes (epochs end
at the first boundary after it), to measure the share for trials of a given length.

Baseline, measured in the same run: the best trial's config trained in this process with
a plain loop (same model, loss, loader, steps), no Ray at all; `trial / bare` is the
trial's wall time over that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")


def _derived_space(space: Path, epochs: int | None, steps: int | None, out: Path,
                   minutes: float | None = None) -> Path:
    raw = yaml.safe_load(space.read_text())
    if minutes is not None:
        raw.setdefault("fixed", {})["time_budget_s"] = 60.0 * minutes
        raw["max_epochs"] = epochs or 10_000  # the budget ends the trial
        raw["grace_period"] = raw["max_epochs"]  # ASHA must not cut a budgeted trial
    elif epochs is not None:
        raw["max_epochs"] = epochs
        raw["grace_period"] = min(raw.get("grace_period", 1), epochs)
    if steps is not None:
        raw.setdefault("fixed", {})["steps_per_epoch"] = steps
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _bare_training_s(cfg, steps: int) -> float:
    """The same training steps in this process, without Ray: the baseline."""
    import torch

    from stroke_ray.losses import build_loss
    from stroke_ray.models import build_model
    from stroke_ray.sampling import make_loader
    from stroke_ray.splits import split_subjects
    from stroke_ray.store import StrokeStore
    from stroke_ray.train import build_optimizer

    torch.set_num_threads(1)  # a Train worker holds one CPU
    store = StrokeStore.open(cfg.data.store)
    train, _ = split_subjects(store.subjects(), cfg.data.val_fraction, cfg.data.split_seed)
    model = build_model(cfg.model, in_channels=len(store.modalities))
    loss_fn = build_loss(cfg.loss, cfg.model.out_channels)
    opt = build_optimizer(model, cfg.optim)
    batches = iter(make_loader(cfg.data, train, cfg.batch_size, seed=cfg.seed))
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        loss = loss_fn(model(batch["image"]), batch["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="smoke", help="a search-space file or a shipped space's name")
    ap.add_argument("--store", default=None, help="store to train on (default: make a 4-case synthetic one)")
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="override max_epochs")
    ap.add_argument("--steps", type=int, default=None, help="override steps_per_epoch")
    ap.add_argument("--trial-minutes", type=float, default=None, help="wall-clock budget per trial")
    ap.add_argument("--skip-baseline", action="store_true", help="no in-process re-run of the best trial's steps")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import ray

    from stroke_ray.config import TrainConfig
    from stroke_ray.resources import search_space_file
    from stroke_ray.search_space import SearchSpace
    from stroke_ray.tune import run_sweep

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    store = args.store
    if store is None and (work / "synth.zarr").exists():
        store = str(work / "synth.zarr")
    if store is None:
        from stroke_ray.ingest import convert_dataset
        from stroke_ray.synth import generate_dataset

        generate_dataset(work / "data", num_cases=4, seed=0, progress=False)
        store = str(work / "synth.zarr")
        convert_dataset(str(work / "data"), store, levels=[64], progress=False)

    space_file = _derived_space(search_space_file(args.space), args.epochs, args.steps, work / "space.yaml",
                                args.trial_minutes)
    space = SearchSpace.load(space_file)
    base = TrainConfig.from_dict({"data": {"store": store}, "experiment": "bench-sweep"})
    t0 = time.perf_counter()
    result = run_sweep(
        space_file, base, name=f"bench-{space.name}", storage_path=str(work / "runs"),
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}", num_samples=args.num_samples, verbose=0,
        resume=True,  # re-running the benchmark on the same workdir re-reads the sweep
    )
    sweep_wall = time.perf_counter() - t0

    import pandas as pd

    rows = []
    for progress in sorted(result.path.glob("*/progress.csv")):
        df = pd.read_csv(progress)
        if not len(df) or "step_time_s" not in df:
            continue
        trial_id = str(df["trial_id"].iloc[-1])
        params = next((t.params for t in result.trials if t.trial_id == trial_id), {})
        cfg = space.trial_config(base, params)
        steps_s = float((df["step_time_s"] * cfg.steps_per_epoch).sum())
        wall = float(df["time_total_s"].iloc[-1])
        first = df.iloc[0]
        laps = {k: float(first[f"startup_{k}_s"]) if f"startup_{k}_s" in df else float("nan")
                for k in ("workers", "imports", "store", "model", "tracking", "first_batch")}
        overhead = float(df["time_total_s"].iloc[0] - df["epoch_time_s"].iloc[0])
        in_loop = sum(laps[k] for k in ("imports", "store", "model", "tracking"))
        rows.append({
            "trial": trial_id,
            "epochs": len(df),
            "wall_s": wall,
            "overhead_s": overhead,
            "driver_s": overhead - laps["workers"] - in_loop,
            **{f"{k}_s": v for k, v in laps.items()},
            "first_step_s": float(df["first_step_s"].iloc[0]),
            "steps_s": steps_s,
            "val_s": float(df["val_time_s"].sum()),
            "in_steps": steps_s / wall,
            "in_steps_val": (steps_s + float(df["val_time_s"].sum())) / wall,
            "start": float(df["timestamp"].iloc[0] - df["time_total_s"].iloc[0]),
            "end": float(df["timestamp"].iloc[-1]),
        })
    table = pd.DataFrame(rows)
    print(table.drop(columns=["start", "end"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    total_steps_s = table["steps_s"].sum()
    # From the trials' own timestamps, so a re-run that only re-reads the sweep reports the same.
    span = table["end"].max() - table["start"].min()
    print(f"\nfirst trial start -> last trial end {span:.1f} s ({len(table)} trials, run_sweep call {sweep_wall:.1f} s); "
          f"in training steps {total_steps_s / span:.1%}, in trial wall time {table['wall_s'].sum() / span:.1%}")
    print(f"per-trial overhead: median {table['overhead_s'].median():.1f} s (target < 5 s); load average "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")

    best = result.best_config
    best_row = table[table["trial"] == result.best.trial_id].iloc[0]
    n = int(best_row["epochs"]) * best.steps_per_epoch  # the epochs it ran (a budget may end it early)
    if args.skip_baseline:
        ray.shutdown()
        return
    bare = _bare_training_s(best, n)
    print(f"baseline: best config, {n} steps in-process without Ray: {bare:.1f} s; "
          f"its trial took {best_row['wall_s']:.1f} s ({best_row['wall_s'] / bare:.1f}x), "
          f"of which steps {best_row['steps_s']:.1f} s ({best_row['steps_s'] / bare:.2f}x the bare steps)")
    ray.shutdown()


if __name__ == "__main__":
    main()
