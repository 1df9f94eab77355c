"""U-Net shapes, parameter matching of the (2+1)D conv, checkpointing, channels_last_3d, autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stroke_ray.config import ModelConfig
from stroke_ray.models import (
    Conv2Plus1D,
    UNet2Plus1D,
    UNet3D,
    build_model,
    count_parameters,
    mid_width,
    size_multiple,
)

ARCHS = ["unet3d", "unet2plus1d"]
TINY = [4, 8, 16]


def _cfg(arch: str, **kw) -> ModelConfig:
    # The plain networks: deep supervision (lists of outputs in training) is tested in test_recipe.py.
    kw.setdefault("deep_supervision", False)
    return ModelConfig(architecture=arch, widths=kw.pop("widths", TINY), **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("upsample", ["trilinear", "transpose"])
def test_output_shape_odd_sizes(arch, upsample):
    torch.manual_seed(0)
    model = build_model(_cfg(arch, upsample=upsample, out_channels=2), in_channels=3)
    out = model(torch.randn(2, 3, 16, 32, 24))
    assert out.shape == (2, 2, 16, 32, 24)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_architectures_differ_in_their_convs():
    a = build_model(_cfg("unet3d"), 1)
    b = build_model(_cfg("unet2plus1d"), 1)
    kernels_a = {m.kernel_size for m in a.modules() if isinstance(m, nn.Conv3d)}
    kernels_b = {m.kernel_size for m in b.modules() if isinstance(m, nn.Conv3d)}
    assert (3, 3, 3) in kernels_a and (3, 3, 1) not in kernels_a
    assert {(3, 3, 1), (1, 1, 3)} <= kernels_b and (3, 3, 3) not in kernels_b
    assert isinstance(a, UNet3D) and isinstance(b, UNet2Plus1D)


def test_through_plane_axis_is_z():
    """A (2+1)D conv mixes neighbouring slices along the last axis only through the (1,1,3) conv."""
    conv = Conv2Plus1D(1, 1, mid_channels=1).eval()
    x = torch.zeros(1, 1, 5, 5, 5)
    x[0, 0, 2, 2, 2] = 1.0
    with torch.no_grad():
        for m in conv:
            if isinstance(m, nn.Conv3d):
                m.weight.fill_(1.0)
        y = conv(x)[0, 0]
    nz = y.nonzero()
    assert set(nz[:, 0].tolist()) == {1, 2, 3}  # in-plane spread by 1 in X
    assert set(nz[:, 2].tolist()) == {1, 2, 3}  # through-plane spread by 1 in Z
    assert (y != 0).sum() == 27


@pytest.mark.parametrize("n_in,n_out", [(16, 32), (32, 32), (64, 128), (128, 64), (256, 512)])
def test_2plus1d_conv_matches_3d_parameter_count(n_in, n_out):
    full = count_parameters(nn.Conv3d(n_in, n_out, 3, padding=1, bias=False))
    factored = count_parameters(Conv2Plus1D(n_in, n_out))  # both convs + the BatchNorm between
    assert full == 27 * n_in * n_out
    assert abs(factored - full) / full < 0.01, (factored, full)


def test_mid_width_formula():
    # M = floor(27 * 16 * 32 / (9 * 16 + 3 * 32)) = floor(57.6)
    assert mid_width(16, 32) == 57
    assert mid_width(64, 64) == 144  # 27 * 64 * 64 / (12 * 64)
    conv = Conv2Plus1D(8, 8, mid_channels=5)
    assert conv[0].out_channels == 5 and conv[3].in_channels == 5


def test_default_widths_parameter_count():
    n3d = count_parameters(build_model(ModelConfig(architecture="unet3d", deep_supervision=False), in_channels=3))
    n21 = count_parameters(build_model(ModelConfig(architecture="unet2plus1d"), in_channels=3))
    # Documented in docs/models.md: 21,361,441 vs 21,366,816 for 3 input channels, 1 output.
    assert n3d == 21_361_441
    assert abs(n21 - n3d) / n3d < 0.01
    # Deep supervision adds one 1x1x1 head (weights + bias) per decoder level 64, 128, 256.
    with_heads = count_parameters(build_model(ModelConfig(architecture="unet3d"), in_channels=3))
    assert with_heads - n3d == (64 + 1) + (128 + 1) + (256 + 1)


def test_size_multiple_and_bad_size():
    cfg = _cfg("unet3d", widths=[4, 8, 16, 32])
    assert size_multiple(cfg) == 8
    model = build_model(cfg, 1)
    assert model(torch.randn(1, 1, 8, 16, 24)).shape == (1, 1, 8, 16, 24)
    with pytest.raises(ValueError, match=r"\(8, 12, 16\).*multiple of 8"):
        model(torch.randn(1, 1, 8, 12, 16))


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_same_output_gradients_and_running_stats(arch):
    torch.manual_seed(0)
    plain = build_model(_cfg(arch), 2).train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    x = torch.randn(2, 2, 8, 8, 8)
    out_plain, out_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    (out_plain**2).mean().backward()
    (out_ckpt**2).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    # The recomputation in backward must not update BatchNorm statistics a second time.
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_3d_matches(arch):
    torch.manual_seed(0)
    model = build_model(_cfg(arch), 2).eval()
    x = torch.randn(1, 2, 8, 16, 8)
    with torch.no_grad():
        ref = model(x)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
        out = model_cl(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out.contiguous(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_autocast_trains(arch):
    torch.manual_seed(0)
    model = build_model(_cfg(arch), 1).train()
    # 16^3, not 8^3: at 8^3 the deepest level is 2x2x2, and oneDNN's bf16 weight gradient of a
    # (3,3,1) conv on a 2x2 in-plane input is intermittently NaN (torch 2.13 CPU, AVX512; not
    # with mkldnn disabled, not in fp32). Training never runs bf16 on the CPU (docs/models.md).
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1, 16, 16, 16)
    out.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_upsample_and_architecture():
    with pytest.raises(ValueError, match="upsample"):
        UNet3D(1, 1, TINY, upsample="nearest")
    cfg = _cfg("unet3d")
    cfg.architecture = "vnet"  # bypasses validation on purpose
    with pytest.raises(ValueError, match="vnet"):
        build_model(cfg, 1)


@pytest.mark.parametrize("arch", ["unet3d", "unet2plus1d"])
def test_instance_norm_normalises_each_sample_on_its_own(arch):
    # In training mode a BatchNorm network's output for one sample depends on the other
    # samples of its batch; an InstanceNorm network's does not, and it keeps no running stats.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, 16)
    other = x.clone()
    other[1] = 5.0 * torch.randn(3, 16, 16, 16) + 3.0
    outputs = {}
    for norm in ("batch", "instance"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(architecture=arch, widths=[4, 8], norm=norm), in_channels=3).train()
        with torch.no_grad():
            outputs[norm] = (model(x)[0], model(other)[0])
        kinds = {type(m) for m in model.modules()}
        assert (nn.InstanceNorm3d in kinds) == (norm == "instance") and (nn.BatchNorm3d in kinds) == (norm == "batch")
    assert not torch.allclose(*outputs["batch"], atol=1e-4)
    assert torch.allclose(*outputs["instance"], atol=1e-5)
    with pytest.raises(ValueError):
        ModelConfig(norm="group")
