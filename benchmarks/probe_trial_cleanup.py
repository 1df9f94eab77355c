"""Is the sweep's trial clean-up (tune_trial.TrialCleanup) still needed when local Ray runs its dashboard?

Usage: .venv/bin/python benchmarks/probe_trial_cleanup.py VARIANT WORKDIR   (with | without | bare)
"with": the sweep as shipped. "without": the placement-group release is replaced by a probe
that only counts the orphaned Train groups it would have removed (and removes nothing).
"bare": neither groups released nor the trials' MLflow runs closed by the callback.
Every trial is stopped by Tune after 2 of its 4 epochs (a stopper), as ASHA stops trials.
Each variant records, per finished trial, the orphaned groups alive at that moment and a
few seconds later, the sweep's wall time and the trials' statuses.
"""
import json
import sys
import time
from pathlib import Path

from ray.tune.stopper import MaximumIterationStopper

from stroke_ray import ray_compat, tune_trial
from stroke_ray import tune as tune_mod
from stroke_ray.config import TrainConfig
from stroke_ray.raycluster import connect
from stroke_ray.tracking import client_for

variant, work = sys.argv[1], Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)

log = []
real_release = ray_compat.release_orphaned_train_groups


def orphans():
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return sorted(pg for pg, info in placement_group_table().items()
                  if pg.endswith(job) and info.get("state") in ("CREATED", "PENDING", "RESCHEDULING")
                  and list(info.get("bundles", {}).values()) != [{"CPU": tune_trial.DRIVER_CPU}])


def probe(keep_bundle):
    found = orphans()
    entry = {"t": round(time.time() - t0, 1), "orphans": len(found)}
    if variant == "with":
        entry["removed"] = real_release(keep_bundle)
    log.append(entry)
    return entry.get("removed", 0)


ray_compat.release_orphaned_train_groups = probe
if variant == "bare":  # neither groups released nor trial runs closed by the callback
    from stroke_ray import tracking as tracking_mod

    tracking_mod.close_trial_run = lambda *args, **kwargs: None

store = work / "store.zarr"
if not store.exists():
    from stroke_ray.ingest import convert_dataset
    from stroke_ray.synth import generate_dataset

    generate_dataset(work / "data", num_cases=4, layout="isles22", seed=0, progress=False)
    convert_dataset(str(work / "data"), str(store), levels=[32], progress=False, parallel=False)

connect(None, num_cpus=2)  # as the product starts local Ray: dashboard on
t0 = time.time()
base = TrainConfig.from_dict({
    "data": {"store": str(store), "level": "32"}, "experiment": f"probe-{variant}",
    "steps_per_epoch": 3, "batch_size": 1, "val_max_subjects": 1,
})
space = "smoke"
result = tune_mod.run_sweep(space, base, name=f"probe-{variant}", storage_path=str(work / "runs"),
                            tracking_uri=f"sqlite:///{work / 'mlflow.db'}", num_samples=4, seed=1,
                            verbose=0, time_budget_s=1500,
                            # Every trial is stopped by Tune after 2 of its 4 epochs, while its
                            # Train run is still going: the case TrialCleanup exists for.
                            stopper=MaximumIterationStopper(2))
wall = time.time() - t0
time.sleep(15)
late = orphans()
client = client_for(f"sqlite:///{work / 'mlflow.db'}")
exp = client.get_experiment_by_name(f"probe-{variant}")
runs = client.search_runs([exp.experiment_id])
print("RESULT " + json.dumps({
    "variant": variant, "wall_s": round(wall, 1),
    "trials": [(t.trial_id, t.status, t.epochs) for t in result.trials],
    "probe_log": log, "orphans_15s_after_end": len(late),
    "mlflow_status": sorted(r.info.status for r in runs),
}))
