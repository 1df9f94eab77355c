"""Checkpoint files: one weights_only-loadable dict that rebuilds the exact model."""

from __future__ import annotations

import pytest
import torch

from stroke_ray.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from stroke_ray.config import TrainConfig
from stroke_ray.errors import StrokeRayError
from stroke_ray.models import build_model

TINY = {"model": {"widths": [4, 8, 16]}, "data": {"level": "32", "patch_size": 16}}


def _trained_bits(cfg: TrainConfig):
    torch.manual_seed(1)
    model = build_model(cfg.model, in_channels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(1, 2, 16, 16, 16)
    outputs = model(x)  # deep supervision (on for unet3d): a list in training mode
    sum(o.mean() for o in (outputs if isinstance(outputs, list) else [outputs])).backward()
    optimizer.step()  # so the optimizer state holds tensors too
    return model, optimizer, x


def test_round_trip_gives_identical_outputs(tmp_path):
    cfg = TrainConfig.from_dict(TINY)
    model, optimizer, x = _trained_bits(cfg)
    path = save_checkpoint(
        tmp_path, model=model, optimizer=optimizer, epoch=3, config=cfg,
        modalities=["dwi", "adc"], normalization="zscore", metrics={"val_dice": torch.tensor(0.5)},
    )
    assert path == tmp_path / CHECKPOINT_FILE
    raw = torch.load(path, weights_only=True)  # no arbitrary unpickling needed
    assert raw["epoch"] == 3 and raw["config"]["model"]["widths"] == [4, 8, 16]

    for ref in (tmp_path, path):  # a directory or the file itself
        loaded = load_checkpoint(ref)
        assert not loaded.model.training
        assert loaded.modalities == ["dwi", "adc"] and loaded.normalization == "zscore"
        assert loaded.epoch == 3 and loaded.metrics == {"val_dice": 0.5}
        assert loaded.config == cfg
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), loaded.model(x))
        assert loaded.optimizer_state["state"], "optimizer moments were not saved"


def test_ddp_style_wrapper_is_unwrapped(tmp_path):
    cfg = TrainConfig.from_dict(TINY)
    model, _, _ = _trained_bits(cfg)

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_checkpoint(tmp_path, model=Wrapper(model), epoch=0, config=cfg, modalities=["dwi", "adc"], normalization="none")
    keys = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["model"].keys()
    assert not any(k.startswith("module.") for k in keys)
    load_checkpoint(tmp_path)


def test_missing_and_corrupt_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(StrokeRayError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(StrokeRayError, match="no such checkpoint file"):
        load_checkpoint(tmp_path)  # a directory without checkpoint.pt

    cfg = TrainConfig.from_dict(TINY)
    model, _, _ = _trained_bits(cfg)
    good = save_checkpoint(tmp_path / "good", model=model, epoch=0, config=cfg, modalities=["dwi", "adc"], normalization="zscore")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(StrokeRayError, match=r"truncated\.pt: not a readable stroke-ray checkpoint"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(StrokeRayError, match=r"foreign\.pt: not a stroke-ray checkpoint"):
        load_checkpoint(foreign)

    mismatched = tmp_path / "mismatched.pt"
    raw = torch.load(good, weights_only=True)
    raw["modalities"] = ["dwi"]  # one input channel: the first conv no longer fits
    torch.save(raw, mismatched)
    with pytest.raises(StrokeRayError, match=r"mismatched\.pt: weights do not fit"):
        load_checkpoint(mismatched)


def test_checkpoint_with_the_old_loader_workers_key_loads_migrated(tmp_path):
    # Checkpoints written before data.num_workers became data.loader_workers carry the old key.
    cfg = TrainConfig.from_dict({**TINY, "data": {**TINY["data"], "loader_workers": 3}})
    model, _, x = _trained_bits(cfg)
    path = save_checkpoint(tmp_path, model=model, epoch=1, config=cfg, modalities=["dwi", "adc"], normalization="zscore")
    payload = torch.load(path, weights_only=True)
    payload["config"]["data"]["num_workers"] = payload["config"]["data"].pop("loader_workers")
    torch.save(payload, path)

    loaded = load_checkpoint(path)
    assert loaded.config == cfg and loaded.config.data.loader_workers == 3
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
