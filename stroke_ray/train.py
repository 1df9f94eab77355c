"""Training on Ray Train: one loop per worker, a checkpoint and a report every epoch.

Read `train_loop_per_worker` top to bottom: it is the whole training. Ray Train runs it on
`cfg.num_workers` workers (DDP over gloo on CPU, NCCL on GPU), persists each reported
checkpoint under `<storage_path>/<name>/`, restarts the worker group from the last
checkpoint when a worker dies (`cfg.max_failures`), and on a re-run with the same name and
storage path resumes from the latest checkpoint of the earlier run.

`build_trainer` is what Ray Tune trials call; `run_training` is the `stroke-ray train`
command: it adds Ray start-up and an MLflow run around one `fit()`.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any, Callable, Iterable

import torch
import yaml

from stroke_ray import model_ref, tracking
from stroke_ray.config import OptimConfig, TrainConfig
from stroke_ray.errors import ConfigError, StrokeRayError
from stroke_ray.locations import absolute, make_folder
from stroke_ray.models import size_multiple
from stroke_ray.raycluster import connect
from stroke_ray.store import NATIVE, StrokeStore
from stroke_ray.tracking import default_tracking_uri

__all__ = [
    "build_optimizer",
    "build_trainer",
    "check_inputs",
    "check_store",
    "lr_at",
    "run_training",
    "train_loop_per_worker",
]

# --- small pieces of the loop --------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW / Adam, or SGD with nnU-Net's Nesterov momentum 0.99."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)


def lr_at(
    cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int, budget_fraction: float | None = None
) -> float:
    """Learning rate at a global optimizer step: linear warm-up, then constant/cosine/poly.

    A pure function of the step (as in nanoGPT), so a resumed run needs no scheduler state;
    under a time budget the schedule follows whichever is further along, the steps or the
    spent share of the budget (`budget_fraction`).
    """
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if budget_fraction is not None:
        progress = max(progress, min(1.0, budget_fraction))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "poly":  # nnU-Net's decay
        return cfg.lr * (1.0 - progress) ** 0.9
    return cfg.lr


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over all workers (identity on a single worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- the loop ------------------------------------------------------------------------------


class _Laps:
    """Seconds between successive marks: where a worker's start-up goes (reported as
    `startup_*` metrics with the first epoch; benchmarks/bench_sweep.py reads them)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[f"startup_{name}_s"] = now - self.last
        self.last = now


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker's training. `config` = {"train": TrainConfig dict, "tracking": {...}}."""
    t_entry, laps = time.time(), _Laps()
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from stroke_ray import tracking
    from stroke_ray.augment import augment_batch, step_generator
    from stroke_ray.budget import TrainingBudget
    from stroke_ray.checkpoint import read_checkpoint, save_checkpoint, unwrap
    from stroke_ray.losses import build_loss
    from stroke_ray.models import build_model, size_multiple
    from stroke_ray.sampling import make_loader
    from stroke_ray.splits import train_val_subjects
    from stroke_ray.store import StrokeStore
    from stroke_ray.validation import ValidationTotals, validate

    laps.mark("imports")
    if "built_at" in config:  # trainer built -> this worker running: Train controller and worker start
        laps.laps["startup_workers_s"] = t_entry - config["built_at"]
    t_start = time.perf_counter()
    cfg = TrainConfig.from_dict(config["train"])
    track = config.get("tracking") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_amp = bool(cfg.amp) and device.type == "cuda"

    # data: the split is a pure function of the subject list and seed, so every worker agrees
    store = StrokeStore.open(cfg.data.store)
    modalities, normalization = store.modalities, store.normalization
    train_subjects, val_subjects = train_val_subjects(store.subjects(), cfg.data)
    if cfg.val_max_subjects is not None:
        val_subjects = val_subjects[: cfg.val_max_subjects]
    laps.mark("store")

    # model, loss, optimizer; identical initial weights on every worker (DDP also broadcasts)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=len(modalities)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    loss_fn = build_loss(cfg.loss, cfg.model.out_channels, small_lesion_weight=cfg.small_lesion_weight)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    multiple = size_multiple(cfg.model)

    # resume: from the last checkpoint of this run (worker restart or a re-run of the same name)
    start_epoch, resumed_metrics = 0, {}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = read_checkpoint(d)
        model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        resumed_metrics = dict(state.get("metrics") or {})
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    laps.mark("model")

    # tracking: rank 0 only, explicit run id, params once per run
    client = run_id = None
    if rank == 0 and track.get("run_id"):
        client, run_id = tracking.client_for(track.get("uri")), track["run_id"]
        if not client.get_run(run_id).data.params:
            tracking.log_params_flat(client, run_id, cfg.model_dump(mode="json"))
            tracking.log_text(client, run_id, _yaml(cfg), "config.yaml")
        if resumed_metrics:
            # A crash between the checkpoint and its MLflow logging would leave a gap in the
            # curves; the checkpoint carries that epoch's metrics (already-logged ones are skipped).
            tracking.log_metrics(client, run_id, resumed_metrics, step=start_epoch - 1)
    laps.mark("tracking")

    # an endless patch stream; reseeded on resume so a restart does not replay the same patches
    loader = make_loader(
        cfg.data, train_subjects, cfg.batch_size, seed=cfg.seed + 1000 * start_epoch, rank=rank, world_size=world
    )
    batches = iter(loader)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    first_step_s = None
    budget = TrainingBudget(cfg.time_budget_s, cfg.time_budget_clock, resumed_metrics.get("budget_spent_s", 0.0))

    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        model.train()
        data_s = step_s = loss_sum = 0.0
        for step in range(cfg.steps_per_epoch):
            t0 = time.perf_counter()
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True)
            target = batch["mask"].to(device, non_blocking=True)
            # augmentation on the device, seeded by (seed, rank, global step): a resumed run
            # draws what the uninterrupted one would have; preset `none` returns the batch as is
            image, target = augment_batch(
                image, target, cfg.augment, air=batch.get("air"),
                generator=step_generator(device, cfg.seed, rank, epoch * cfg.steps_per_epoch + step),
            )
            if device.type == "cuda":
                image = image.contiguous(memory_format=torch.channels_last_3d)
            t1 = time.perf_counter()

            lr = lr_at(cfg.optim, epoch * cfg.steps_per_epoch + step, total_steps, cfg.steps_per_epoch,
                       budget.fraction())
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(model(image), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach())

            t2 = time.perf_counter()
            data_s += t1 - t0
            step_s += t2 - t1
            if first_step_s is None:
                first_step_s = t2 - t_start
                laps.laps["startup_first_batch_s"] = t1 - t0
        train_loss = _all_reduce_sum([loss_sum / cfg.steps_per_epoch], device)[0] / world

        # validation on whole held-out cases in their own space, sharded over workers
        t_val = time.perf_counter()
        totals, example = validate(unwrap(model), store, val_subjects[rank::world], cfg, device, use_amp, multiple)
        totals = ValidationTotals.from_vector(_all_reduce_sum(totals.vector(), device))
        val = totals.metrics()
        val_s = time.perf_counter() - t_val

        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            **val,
            "lr": lr,
            "step_time_s": step_s / cfg.steps_per_epoch,
            "data_time_s": data_s / cfg.steps_per_epoch,
            "val_time_s": val_s,
            "epoch_time_s": time.perf_counter() - t_epoch,
            "first_step_s": first_step_s,
            **(laps.laps if epoch == start_epoch else {}),
        }
        # Every rank stops at the same epoch (DDP would hang otherwise): the slowest decides.
        spent, out_of_budget = _all_reduce_sum([budget.spent(), float(budget.exhausted())], device)
        if budget.limited:
            metrics["budget_spent_s"] = spent / world
        stop = out_of_budget > 0

        # checkpoint every epoch (rank 0 writes, Ray persists it), then log the epoch
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    tmp, model=model, optimizer=optimizer, epoch=epoch, config=cfg,
                    modalities=modalities, normalization=normalization, metrics=metrics,
                    postprocessing=totals.postprocessing(),
                )
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

        if client is not None:
            tracking.log_metrics(client, run_id, metrics, step=epoch)
            last = stop or epoch == cfg.epochs - 1
            every = cfg.overlay_every and (epoch + 1) % cfg.overlay_every == 0
            if example is not None and (last or every):
                subject, image, truth, pred = example
                tracking.log_overlays(client, run_id, image, truth, pred, name=f"epoch{epoch:03d}_{subject}")
        if stop:
            break


def _yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --- driver side ---------------------------------------------------------------------------


def check_store(url: str, levels: Iterable[str]) -> None:
    """Fail with one clear line unless `url` opens, has 2+ complete subjects and every level."""
    try:
        store = StrokeStore.open(url)
    except (FileNotFoundError, ValueError) as exc:
        raise StrokeRayError(f"{url}: cannot open the training store ({exc})") from exc
    subjects = store.subjects()
    if len(subjects) < 2:
        raise StrokeRayError(f"{url}: needs at least 2 complete subjects to train and validate, has {len(subjects)}")
    if NATIVE not in store.levels:
        # Validation scores every case on its own grid, as predict and the challenge do.
        raise StrokeRayError(f"{url}: the store has no {NATIVE!r} level (validation needs each case's own grid)")
    for level in levels:
        if level not in store.levels:
            raise ConfigError(f"data.level: {level!r} is not in the store {url} (levels: {', '.join(store.levels)})")


def check_inputs(cfg: TrainConfig, store: bool = True) -> None:
    """Fail in the driver, with one clear line, on a config the workers could not train
    (`store=False`: the store was checked already, e.g. once for a whole sweep)."""
    if store:
        check_store(cfg.data.store, [cfg.data.level])
    multiple = size_multiple(cfg.model)
    if any(edge % multiple for edge in cfg.data.patch):
        raise ConfigError(f"data.patch_size: {cfg.data.patch_size} is not a multiple of {multiple} (2 ** (len(model.widths) - 1)) on every axis")


def build_trainer(
    cfg: TrainConfig,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    train_loop: Callable[[dict], None] | None = None,
    store_checked: bool = False,
):
    """A TorchTrainer for `cfg`; `fit()` it. Same name + storage path = resume.

    `callbacks` go to RunConfig (e.g. Tune's report callback); with `mlflow_run_id`,
    rank 0 logs params, metrics and overlays into that run. `train_loop` replaces
    `train_loop_per_worker` (it receives the same config dict). `store_checked=True` skips
    opening the store here (a sweep checks it once for all its trials).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = cfg.data.model_copy(update={"store": absolute(cfg.data.store)})
    cfg = cfg.model_copy(update={"data": data})
    check_inputs(cfg, store=not store_checked)
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    loop_config = {
        "train": cfg.model_dump(mode="json"),
        "tracking": {"uri": tracking_uri or cfg.tracking_uri or default_tracking_uri(), "run_id": mlflow_run_id},
        "built_at": time.time(),  # workers report how long they took to start (startup_workers_s)
    }
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=bool(use_gpu),
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name or cfg.name,
            storage_path=absolute(storage_path or cfg.storage_path),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )


def run_training(cfg: TrainConfig, address: str | None = None):
    """Train `cfg` on Ray (local or `address`), tracked in the MLflow run named `cfg.name`.

    Re-running with the same name resumes both the Ray Train run and the MLflow run. The
    final checkpoint is logged as the run's `model/checkpoint.pt`.
    """
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"store": absolute(cfg.data.store)})})
    check_inputs(cfg)  # before any MLflow run exists, so a bad config leaves nothing behind
    make_folder(cfg.storage_path)
    connect(address)
    uri = cfg.tracking_uri or tracking.default_tracking_uri()
    client = tracking.client_for(uri)
    run_id = tracking.get_or_create_run(client, cfg.experiment, cfg.name, tags={tracking.KIND_TAG: "train"})
    try:
        trainer = build_trainer(cfg, mlflow_run_id=run_id, tracking_uri=uri)
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            model_ref.log_model(client, run_id, d)
    client.set_terminated(run_id, "FINISHED")
    result.mlflow_run_id = run_id  # handy for callers; Result is a plain dataclass
    return result
