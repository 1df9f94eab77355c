"""Multi-worker Ray Train on CPU: DDP over gloo with 2 workers of 1 CPU each.

What is checked, and why it is true:

- Gradients are synchronised: after one optimizer step, the parameters of rank 0 and rank 1
  are bit-identical (DDP starts from rank 0's weights and all-reduces every gradient).
- Two workers with batch B equal one worker with batch 2B: the 1-worker run trains on the
  concatenation of the two ranks' batches (the same patches, drawn from the same shards).
  This holds exactly only for a loss that is a mean over independent samples and a network
  whose output for a sample does not depend on the others. BatchNorm in training mode
  breaks the second (each rank normalises with its own batch's statistics, so a 2-worker
  step is *not* a 2B step), and the Dice terms break the first (one ratio over the whole
  batch). So the comparison runs the network with BatchNorm on its running statistics
  (`eval()`, identical on both sides) and plain BCE (a mean over voxels, both ranks holding
  the same number), with SGD (Adam's first step is ~lr * sign(g), which turns float noise in
  a near-zero gradient into a full step). Then the averaged DDP gradient is the 2B gradient
  up to float32 summation order: losses agree to 1e-5 relative, weights after the step to
  1e-6 absolute (lr 0.1 times gradient differences of ~1e-7).
- The two ranks draw from disjoint subject shards.
- A worker dying with 2 workers restarts the group from the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stroke_ray.checkpoint import load_checkpoint
from stroke_ray.config import TrainConfig
from stroke_ray.grid import cube_affine
from stroke_ray.store import NATIVE, LevelArrays, StrokeStore
from stroke_ray.train import build_trainer, train_loop_per_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store4(tmp_path_factory) -> str:
    """Five 2-channel 32^3 subjects with a bright lesion each (levels "native" and "32", one
    grid: validation scores each case on its own grid): 4 train, 1 val."""
    url = str(tmp_path_factory.mktemp("store") / "ddp.zarr")
    store = StrokeStore.create(url, ["dwi", "adc"], [NATIVE, "32"])
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"))
    affine = cube_affine((32, 32, 32), np.diag([-2.0, 2.0, 2.0, 1.0]), 32)
    for i in range(5):
        centre = rng.integers(10, 22, size=3)[:, None, None, None]
        mask = (((grid - centre) / 4.0) ** 2).sum(0) <= 1
        image = rng.normal(0.0, 0.3, size=(2, 32, 32, 32)).astype(np.float32)
        image[0][mask] += 2.0
        image[1][mask] -= 1.0
        arrays = LevelArrays(image=image, mask=mask.astype(np.uint8), affine=affine)
        store.write_subject(
            f"sub-{i:02d}",
            {NATIVE: arrays, "32": arrays},
            {"norm": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "region": "brain"}},
        )
    return url


def config(store: str, tmp: Path, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({
        "name": "ddp",
        "model": {"widths": [4, 8, 16], "deep_supervision": False},
        "data": {"store": store, "level": "32", "patch_size": 16, "sampler": "foreground",
                 "samples_per_volume": 1, "val_fraction": 0.2},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "val_overlap": 0.0,
        "storage_path": str(tmp / "runs"),
        **overrides,
    })


def test_two_workers_synchronise_gradients_and_match_one_worker_with_twice_the_batch(
        ray_local, store4, tmp_path):
    def _one_step_loop(config: dict) -> None:  # a closure: Ray pickles it by value
        """One SGD step of the real model on the real patch stream; each rank saves what it saw."""
        import ray.train
        import ray.train.torch
        import torch

        from stroke_ray.checkpoint import unwrap
        from stroke_ray.losses import build_loss
        from stroke_ray.models import build_model
        from stroke_ray.sampling import make_loader
        from stroke_ray.splits import split_subjects
        from stroke_ray.store import StrokeStore

        cfg = TrainConfig.from_dict(config["train"])
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        store = StrokeStore.open(cfg.data.store)
        train, _ = split_subjects(store.subjects(), cfg.data.val_fraction, cfg.data.split_seed)
        # The data of two ranks: this rank's only under DDP, both (concatenated) on one worker.
        ranks = [rank] if world > 1 else list(range(config["shards"]))
        batches = [next(iter(make_loader(cfg.data, train, cfg.batch_size, seed=cfg.seed, rank=r,
                                         world_size=config["shards"]))) for r in ranks]
        image = torch.cat([b["image"] for b in batches])
        target = torch.cat([b["mask"] for b in batches])

        torch.manual_seed(cfg.seed)
        model = ray.train.torch.prepare_model(build_model(cfg.model, in_channels=len(store.modalities)))
        model.eval()  # BatchNorm on its running statistics: see the module docstring
        initial = torch.cat([p.detach().flatten() for p in unwrap(model).parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = build_loss("bce")(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        params = torch.cat([p.detach().flatten() for p in unwrap(model).parameters()])
        subjects = sorted({s for b in batches for s in b["subject"]})
        torch.save({"loss": float(loss), "params": params, "initial": initial, "subjects": subjects},
                   Path(config["out"]) / f"world{world}-rank{rank}.pt")
        ray.train.report({"loss": float(loss)})

    out = tmp_path / "out"
    out.mkdir()
    for workers in (2, 1):  # batch 2 per rank; the 1-worker run concatenates both ranks: 4
        cfg = config(store4, tmp_path, name=f"ddp-{workers}", num_workers=workers)
        trainer = build_trainer(cfg, train_loop=_one_step_loop)
        trainer.train_loop_config.update(out=str(out), shards=2)
        assert trainer.fit().error is None
    rank0, rank1 = (torch.load(out / f"world2-rank{r}.pt") for r in (0, 1))
    single = torch.load(out / "world1-rank0.pt")

    # gradients synchronised: identical weights on both ranks after the step
    assert torch.equal(rank0["params"], rank1["params"])
    # the step moved the weights (else identical weights would prove nothing)
    assert (rank0["params"] - rank0["initial"]).abs().max() > 1e-4
    assert torch.equal(rank0["initial"], single["initial"])
    # disjoint shards of the 4 training subjects
    assert rank0["subjects"] and rank1["subjects"]
    assert not set(rank0["subjects"]) & set(rank1["subjects"])
    assert sorted(rank0["subjects"] + rank1["subjects"]) == single["subjects"]
    # 2 x B on two workers == 2B on one worker (module docstring: eval-mode BN, BCE, SGD)
    mean_loss = (rank0["loss"] + rank1["loss"]) / 2
    assert mean_loss == pytest.approx(single["loss"], rel=1e-5)
    assert torch.allclose(rank0["params"], single["params"], atol=1e-6, rtol=0)


def test_two_worker_failure_restarts_from_the_last_checkpoint(ray_local, store4, tmp_path):
    def _rank1_fails_once(config: dict) -> None:
        """The real loop on 2 workers; on the first attempt rank 1 dies after epoch 0."""
        import ray.train

        first_attempt = ray.train.get_checkpoint() is None
        if first_attempt:
            train_loop_per_worker({**config, "train": {**config["train"], "epochs": 1}})
            if ray.train.get_context().get_world_rank() == 1:
                Path(config["marker"]).touch()
                raise RuntimeError("simulated crash of rank 1 after epoch 0")
            return
        train_loop_per_worker(config)

    cfg = config(store4, tmp_path, name="ddp-flaky", num_workers=2, epochs=2, max_failures=1)
    trainer = build_trainer(cfg, train_loop=_rank1_fails_once)
    trainer.train_loop_config["marker"] = str(tmp_path / "rank1-crashed")
    result = trainer.fit()
    assert (tmp_path / "rank1-crashed").exists()
    assert result.error is None
    assert result.metrics_dataframe["epoch"].tolist() == [0, 1]  # epoch 0 not trained twice
    with result.checkpoint.as_directory() as d:
        assert load_checkpoint(d).epoch == 1
