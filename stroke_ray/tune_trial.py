"""One trial of a sweep: what it runs, what it holds, and what closes it when Tune stops it.

`TrialDriver` is the Tune trainable (a sampled configuration -> one Ray Train job),
`trial_concurrency` how many such trials fit on the cluster at once (crossval's folds use it
too), and `TrialCleanup` the Tune callback that closes what a stopped trial leaves open.
`tune.run_sweep` puts them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
import yaml
from ray import tune

from stroke_ray import ray_compat, tracking
from stroke_ray.config import TrainConfig, flatten
from stroke_ray.locations import join
from stroke_ray.search_space import SearchSpace
from stroke_ray.train import build_trainer

__all__ = ["DRIVER_CPU", "TrialCleanup", "TrialDriver", "trial_concurrency"]

# The trial driver only builds a TorchTrainer and waits: a sliver of a CPU, so it never
# competes with its own Train worker for a core.
DRIVER_CPU = 0.01


def trial_concurrency(cfg: TrainConfig, resources: dict[str, float] | None = None) -> int:
    """How many trials fit at once: the fewest of available CPUs (and GPUs) / what one trial holds."""
    resources = resources if resources is not None else ray.available_resources()
    gpus = resources.get("GPU", 0.0)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    # Each trial's driver holds DRIVER_CPU beside its workers: with 2 CPUs and 1-CPU trials,
    # two trials need 2.02 CPUs and the second worker group would wait forever. The 1e-9
    # absorbs float error in fractional settings (4 x 0.25 GPU is 1 GPU).
    per_trial = cfg.num_workers * cfg.cpus_per_worker + DRIVER_CPU
    fit = math.floor(resources.get("CPU", 1.0) / per_trial + 1e-9)
    if use_gpu:
        fit = min(fit, math.floor(gpus / (cfg.num_workers * cfg.gpus_per_worker) + 1e-9))
    return max(1, fit)


@dataclass
class TrialDriver:
    """The Tune trainable: one Ray Train job per trial (a picklable callable, no globals)."""

    space: SearchSpace
    base: dict
    sweep_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str

    def __call__(self, config: dict) -> None:
        # Runs in a Tune trial actor: Ray Train's callback is imported where it is used.
        from ray.tune.integration.ray_train import TuneReportCallback


        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        params = self.space.decode(flatten(config))
        cfg = self.space.trial_config(TrainConfig.model_validate(self.base), params)
        cfg = cfg.model_copy(update={"tracking_uri": self.tracking_uri})

        client = tracking.client_for(self.tracking_uri)
        run_id = tracking.trial_run(client, self.experiment, self.parent_run_id, self.sweep_dir, trial_id)
        # The same flattened config the train loop would log (it skips runs that have params),
        # plus the sampled values under search.* so MLflow can compare trials on them alone.
        if not client.get_run(run_id).data.params:
            tracking.log_params_flat(client, run_id, {**cfg.model_dump(mode="json"), "search": params})
            client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        client.set_tag(run_id, "stroke_ray.trial_dir", ctx.get_trial_dir())
        trainer = build_trainer(
            cfg,
            run_name=f"trial-{trial_id}",
            storage_path=join(self.sweep_dir, "train"),
            callbacks=[TuneReportCallback()],
            mlflow_run_id=run_id,
            store_checked=True,  # run_sweep checked the store and every level a trial can use
        )
        try:
            trainer.fit()
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")


class TrialCleanup(tune.Callback):
    """Closes what a trial stopped by Tune (ASHA, a stopper) cannot close itself.

    Tune stops such a trial by ending its driver while the Ray Train run inside is still
    going, so (1) the trial's MLflow run is not closed as FINISHED and (2) the Train worker
    group's placement group outlives it and its CPUs starve every later trial. Both still
    happen on Ray 2.60 with the local dashboard running (benchmarks/probe_trial_cleanup.py,
    docs/benchmarks.md): without this callback a 4-trial sweep whose trials Tune stops ran
    1 trial in 25 min, with it all 4 in 4 min. Placement groups are released only when no
    other trial of this sweep is running, so a live trial's workers are never touched;
    Tune's own trial groups are kept.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_id: str):
        self.tracking_uri, self.experiment, self.parent_id = tracking_uri, experiment, parent_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trials, trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trials, trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        ray_compat.release_orphaned_train_groups({"CPU": DRIVER_CPU})

    def _close(self, trials, trial, status: str) -> None:
        tracking.close_trial_run(self.tracking_uri, self.experiment, self.parent_id, trial.trial_id, status)
        if not any(t is not trial and t.status == "RUNNING" for t in trials):
            ray_compat.release_orphaned_train_groups({"CPU": DRIVER_CPU})
