"""The training recipe's foundations: physical-spacing levels, planning, deep supervision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stroke_ray.config import ModelConfig, TrainConfig
from stroke_ray.errors import ConfigError, StrokeRayError
from stroke_ray.grid import (
    foreground_box,
    level_grid,
    parse_level,
    resample_mask,
    spacing_grid,
    spacing_of,
)
from stroke_ray.losses import (
    DeepSupervisionLoss,
    build_loss,
    deep_supervision_weights,
    downsample_target,
)
from stroke_ray.models import build_model, inference_state_dict
from stroke_ray.plan import Fingerprint, estimate_training_bytes, plan_training

LAS_2MM = np.array([[-2.0, 0, 0, 110], [0, 2.0, 0, -120], [0, 0, 2.0, -70], [0, 0, 0, 1]])


# --- levels --------------------------------------------------------------------------------
def test_level_names_parse_and_bad_ones_are_refused():
    assert parse_level("native") == ("native", None)
    assert parse_level(64) == ("cube", 64)
    assert parse_level("2mm") == ("spacing", 2.0) and parse_level("1.5mm").value == 1.5
    for bad in ("3cm", "2 mm", "0mm", "64.5", "3", "fine"):
        with pytest.raises(ValueError):
            parse_level(bad)
    with pytest.raises(ConfigError, match="data.level"):
        TrainConfig.from_dict({"data": {"level": "3cm"}})


def test_spacing_grid_is_isotropic_keeps_directions_and_covers_the_box():
    shape = (112, 112, 73)
    box = ((10, 20, 5), (100, 90, 70))
    out_shape, affine = spacing_grid(shape, LAS_2MM, 1.5, box, margin_mm=0.0)
    np.testing.assert_allclose(spacing_of(affine), 1.5)
    assert np.sign(affine[0, 0]) == np.sign(LAS_2MM[0, 0])  # LAS stays LAS
    # The box's physical extent (voxel edges) fits in the new grid: 90 x 2 mm = 180 mm -> 120.
    assert out_shape == (120, 94, 87)
    # Both grids share the box centre.
    centre_src = LAS_2MM @ np.array([(10 + 99) / 2, (20 + 89) / 2, (5 + 69) / 2, 1.0])
    centre_dst = affine @ np.append((np.asarray(out_shape) - 1) / 2.0, 1.0)
    np.testing.assert_allclose(centre_src, centre_dst, atol=1e-9)


def test_spacing_level_crops_to_the_brain_and_keeps_a_small_lesion():
    shape = (60, 60, 40)
    image = np.zeros((2, *shape), np.float32)
    image[:, 15:45, 10:50, 8:30] = 1.0  # the "brain"
    lesion = np.zeros(shape, np.uint8)
    lesion[30:32, 30:32, 20:22] = 1  # a 2-voxel-wide dot, 4 mm across at 2 mm
    assert foreground_box(image) == ((15, 10, 8), (45, 50, 30))
    lshape, laffine = level_grid("2mm", shape, LAS_2MM, image=image)
    assert lshape[0] < shape[0] and lshape[1] < shape[1]  # cropped
    small = resample_mask(lesion, LAS_2MM, lshape, laffine)
    assert small.sum() > 0  # the dot survives at the training resolution
    # Same name -> same grid as cube and native levels keep theirs.
    assert level_grid("native", shape, LAS_2MM)[0] == shape
    assert level_grid("32", shape, LAS_2MM)[0] == (32, 32, 32)


def test_make_levels_writes_a_spacing_level(tmp_path):
    from stroke_ray.ingest import PreparedCase, check_levels, make_levels

    shape = (40, 40, 30)
    image = np.zeros((1, *shape), np.float32)
    image[0, 5:35, 5:35, 5:25] = 100.0
    mask = np.zeros(shape, np.uint8)
    mask[18:24, 18:24, 12:18] = 1
    case = PreparedCase("s", ["dwi"], image, mask, LAS_2MM, {})
    levels = make_levels(case, check_levels(["16", "3mm"]))
    assert set(levels) == {"native", "16", "3mm"}
    np.testing.assert_allclose(spacing_of(levels["3mm"].affine), 3.0)
    # Lesion volume kept within 30 % through the 1.5x coarser grid.
    ml = lambda arr, aff: arr.sum() * np.prod(spacing_of(aff))  # noqa: E731
    assert abs(ml(levels["3mm"].mask, levels["3mm"].affine) - ml(mask, LAS_2MM)) / ml(mask, LAS_2MM) < 0.3
    with pytest.raises(ConfigError):
        check_levels(["2mm", "2mm"])
    with pytest.raises(ConfigError):
        check_levels(["native"])


# --- planning ------------------------------------------------------------------------------
def _fingerprint(shape=(90, 110, 90), subjects=40) -> Fingerprint:
    return Fingerprint("s.zarr", "2mm", subjects, 3, ["dwi", "adc", "flair"], shape, (2.0, 2.0, 2.0),
                       int(np.prod(shape)) * subjects, 12.0, 0.2)


def test_plan_picks_a_smaller_patch_for_a_smaller_budget():
    fp = _fingerprint()
    big = plan_training(fp, memory_budget=8 * 1024**3, base_width=32)
    small = plan_training(fp, memory_budget=1 * 1024**3, base_width=32)
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    for plan in (big, small):
        multiple = 2 ** (len(plan.widths) - 1)
        assert all(edge % multiple == 0 for edge in plan.patch_size)
        assert all(edge <= s for edge, s in zip(plan.patch_size, fp.median_shape))
        assert plan.batch_size >= 2
        assert plan.estimated_gb <= plan.memory_budget_gb
    cfg = TrainConfig().model_copy()
    raw = cfg.model_dump(mode="json")
    updates = small.config_updates()
    raw["data"].update(updates["data"])
    raw["model"].update(updates["model"])
    TrainConfig.from_dict(raw)  # the plan is a valid training config
    with pytest.raises(StrokeRayError, match="too small"):
        plan_training(fp, memory_budget=1024**2, base_width=32)


def test_cpu_plan_is_sized_by_compute_in_millimetres():
    from stroke_ray.plan import CPU_STEP_VOXELS, plan_for_compute

    at_2mm = plan_for_compute(_fingerprint())
    assert at_2mm.patch_size == (32, 32, 32) and at_2mm.batch_size == CPU_STEP_VOXELS // 32**3
    assert at_2mm.memory_budget_gb is None and at_2mm.basis.startswith("compute")
    assert at_2mm.widths == [16, 32, 64, 128]  # three poolings keep a 4-voxel bottleneck
    coarse = plan_for_compute(Fingerprint("s.zarr", "4mm", 40, 3, ["dwi", "adc", "flair"], (45, 55, 45),
                                          (4.0, 4.0, 4.0), 45 * 55 * 45 * 40, 12.0, 0.2))
    assert coarse.patch_size == (16, 16, 16) and coarse.batch_size == min(32, CPU_STEP_VOXELS // 16**3)
    small_head = plan_for_compute(_fingerprint(shape=(20, 40, 40)))  # a median shape below 64 mm
    assert small_head.patch_size[0] <= 20 and small_head.batch_size > at_2mm.batch_size
    with pytest.raises(StrokeRayError, match="too few"):
        plan_for_compute(_fingerprint(shape=(6, 40, 40)))


def test_memory_estimate_grows_with_patch_batch_and_width():
    base = estimate_training_bytes((64, 64, 64), 2, [16, 32, 64, 128], 3)
    assert estimate_training_bytes((96, 64, 64), 2, [16, 32, 64, 128], 3) > base
    assert estimate_training_bytes((64, 64, 64), 4, [16, 32, 64, 128], 3) > base
    assert estimate_training_bytes((64, 64, 64), 2, [32, 64, 128, 256], 3) > base


def test_plan_command_writes_a_valid_config(synth_store_2mm, tmp_path):
    from typer.testing import CliRunner

    from stroke_ray.cli import app

    out = tmp_path / "planned.yaml"
    result = CliRunner().invoke(app, ["plan", synth_store_2mm, "--level", "4mm", "--memory-gb", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = TrainConfig.from_yaml(out)
    assert cfg.data.level == "4mm" and cfg.data.store == synth_store_2mm
    assert all(edge % 2 ** (len(cfg.model.widths) - 1) == 0 for edge in cfg.data.patch)
    # the shipped recipe, completed by the plan: what `stroke-ray train -c planned.yaml` trains
    recipe = TrainConfig.from_yaml("recipe")
    assert (cfg.data.sampler, cfg.model.norm, cfg.loss, cfg.augment) == (
        "lesion", "instance", recipe.loss, recipe.augment)
    assert cfg.model.deep_supervision and recipe.data.level == "2mm"
    bad = CliRunner().invoke(app, ["plan", synth_store_2mm, "--level", "7mm"])
    assert bad.exit_code == 2 and "no level '7mm'" in bad.output


@pytest.fixture(scope="module")
def synth_store_2mm(synth_dataset, tmp_path_factory) -> str:
    from stroke_ray.ingest import convert_dataset

    out = str(tmp_path_factory.mktemp("store2mm") / "synth.zarr")
    report = convert_dataset(str(synth_dataset), out, levels=["4mm"], parallel=False, progress=False)
    assert report.converted == 4, report.summary()
    return out


# --- deep supervision ----------------------------------------------------------------------
def test_deep_supervision_outputs_in_training_only_and_loads_without_heads():
    cfg = ModelConfig(widths=[4, 8, 16, 32], deep_supervision=True)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=2)
    x = torch.randn(2, 2, 16, 16, 16)
    outputs = model.train()(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    single = model.eval()(x)
    assert torch.is_tensor(single) and single.shape == (2, 1, 16, 16, 16)
    # An inference model has no heads and gives the same output from the same weights.
    plain = build_model(cfg, in_channels=2, for_inference=True)
    plain.load_state_dict(inference_state_dict(model.state_dict()))
    torch.testing.assert_close(plain.eval()(x), single)
    assert not any(k.startswith("ds_heads.") for k in plain.state_dict())


def test_deep_supervision_is_on_by_default_for_the_3d_unet_only():
    assert ModelConfig(architecture="unet3d").deep_supervision is True
    assert ModelConfig(architecture="unet2plus1d").deep_supervision is False
    assert ModelConfig(architecture="unet3d", deep_supervision=False).deep_supervision is False


def test_deep_supervision_loss_weights_and_targets():
    assert deep_supervision_weights(1) == [1.0]
    w = deep_supervision_weights(4)  # 1, 1/2, 1/4, 0 normalised
    np.testing.assert_allclose(w, [4 / 7, 2 / 7, 1 / 7, 0.0])
    target = torch.zeros(1, 1, 8, 8, 8)
    target[0, 0, 0, 0, 0] = 1  # one voxel: an eighth of a coarse voxel, kept as 1/8
    assert downsample_target(target, (4, 4, 4), 1)[0, 0, 0, 0, 0] == pytest.approx(0.125)
    assert downsample_target(target, (4, 4, 4), 2).unique().tolist() in ([0.0], [0.0, 1.0])
    loss = build_loss("dice_ce")
    assert isinstance(loss, DeepSupervisionLoss)
    logits = [torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 4, 4, 4), torch.randn(1, 1, 2, 2, 2)]
    inner = loss.loss
    expected = sum(
        wi * inner(li, downsample_target(target, tuple(li.shape[2:]), 1))
        for wi, li in zip(deep_supervision_weights(3), logits)
    )
    torch.testing.assert_close(loss(logits, target), expected)
    torch.testing.assert_close(loss(logits[0], target), inner(logits[0], target))


def test_deep_supervised_network_trains_every_head():
    cfg = ModelConfig(widths=[4, 8, 16, 32], deep_supervision=True)
    model = build_model(cfg, in_channels=1).train()
    target = (torch.rand(2, 1, 16, 16, 16) > 0.9).float()
    build_loss("dice_bce")(model(torch.randn(2, 1, 16, 16, 16)), target).backward()
    # Every parameter gets a gradient (DDP requires it), the zero-weighted head's is zero.
    assert all(p.grad is not None for p in model.parameters())
    assert model.ds_heads[-1].weight.grad.abs().sum() == 0
    assert model.ds_heads[0].weight.grad.abs().sum() > 0
