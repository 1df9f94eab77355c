"""3D U-Nets for lesion segmentation: a plain 3D U-Net and a (2+1)D variant.

Both networks are the classic U-Net (Ronneberger et al. 2015; Cicek et al. 2016):

    encoder  level i : DoubleConv(widths[i-1] -> widths[i]), then MaxPool3d(2) to go down
    decoder  level i : Up(widths[i+1] -> widths[i]), concat skip, DoubleConv(2*widths[i] -> widths[i])
    head             : 1x1x1 conv to `out_channels` logits

A DoubleConv is (conv, norm, ReLU) twice, the norm a BatchNorm3d (`norm: batch`, the seed
study's) or an affine InstanceNorm3d (`norm: instance`, nnU-Net's: each sample normalised
by its own statistics, so a batch of 2 patches trains as well as a batch of 32, and a scan
from another scanner is not normalised with the training set's running statistics). The
only difference between the two architectures is the conv: `UNet3D` uses a 3x3x3 kernel;
`UNet2Plus1D` factors every 3x3x3 conv into a (3,3,1) in-plane conv, norm+ReLU, then a
(1,1,3) through-plane conv
(Tran et al. 2018, "A Closer Look at Spatiotemporal Convolutions for Action Recognition").
The through-plane axis is the LAST spatial axis (Z), which is the slice axis of the volumes
in the store (axial acquisitions such as ISLES'22 FLAIR have their thick slices along Z).

Deep supervision (nnU-Net): with `deep_supervision=True` each decoder level below the top
gets its own 1x1x1 head, and in training mode `forward` returns the list of logits
[full, 1/2, 1/4, ...] (highest resolution first); `losses.DeepSupervisionLoss` weighs them.
In eval mode, and with `deep_supervision=False`, it returns the full-resolution logits only,
so inference, export and serving never see the extra heads.

Input sizes must be a multiple of `size_multiple(cfg)` = 2 ** (depth - 1) on every axis.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stroke_ray.config import ModelConfig

__all__ = [
    "build_model",
    "conv3d",
    "count_parameters",
    "mid_width",
    "size_multiple",
    "Conv2Plus1D",
    "ConvFactory",
    "DoubleConv",
    "UNet",
    "UNet2Plus1D",
    "UNet3D",
    "Up",
    "inference_state_dict",
    "norm_layer",
]

ConvFactory = Callable[[int, int], nn.Module]
NormFactory = Callable[[int], nn.Module]


def norm_layer(kind: str) -> NormFactory:
    """The normalisation layer of `kind` ("batch" or "instance") for a given channel count."""
    if kind == "batch":
        return nn.BatchNorm3d
    if kind == "instance":
        return lambda n: nn.InstanceNorm3d(n, affine=True)
    raise ValueError(f"unknown norm {kind!r} (batch or instance)")


def mid_width(n_in: int, n_out: int, d: int = 3, t: int = 3) -> int:
    """Tran et al.'s parameter-matched intermediate width of a (2+1)D conv:
    M = floor(t d^2 N_in N_out / (d^2 N_in + t N_out)), so d^2 N_in M + t M N_out ~= t d^2 N_in N_out."""
    return max(1, (t * d * d * n_in * n_out) // (d * d * n_in + t * n_out))


def conv3d(n_in: int, n_out: int) -> nn.Module:
    """A plain 3x3x3 conv (no bias: a norm follows)."""
    return nn.Conv3d(n_in, n_out, kernel_size=3, padding=1, bias=False)


class Conv2Plus1D(nn.Sequential):
    """A 3x3x3 conv factored into (3,3,1) in-plane -> norm -> ReLU -> (1,1,3) through-plane (Z)."""

    def __init__(self, n_in: int, n_out: int, mid_channels: int | None = None, norm: NormFactory = nn.BatchNorm3d):
        mid = mid_channels or mid_width(n_in, n_out)
        super().__init__(
            nn.Conv3d(n_in, mid, kernel_size=(3, 3, 1), padding=(1, 1, 0), bias=False),
            norm(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, n_out, kernel_size=(1, 1, 3), padding=(0, 0, 1), bias=False),
        )


class DoubleConv(nn.Sequential):
    """(conv -> norm -> ReLU) x 2."""

    def __init__(self, n_in: int, n_out: int, conv: ConvFactory = conv3d, norm: NormFactory = nn.BatchNorm3d):
        super().__init__(
            conv(n_in, n_out),
            norm(n_out),
            nn.ReLU(inplace=True),
            conv(n_out, n_out),
            norm(n_out),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Double the spatial size and halve the channels (n_in -> n_out)."""

    def __init__(self, n_in: int, n_out: int, mode: str = "trilinear"):
        super().__init__()
        if mode == "trilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                nn.Conv3d(n_in, n_out, kernel_size=1),
            )
        elif mode == "transpose":
            self.up = nn.ConvTranspose3d(n_in, n_out, kernel_size=2, stride=2)
        else:
            raise ValueError(f"upsample must be 'trilinear' or 'transpose', got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module):
    """Keep BatchNorm running statistics unchanged while a checkpointed block is recomputed,
    so that checkpointing does not count every training batch twice in the running stats."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(norms, saved):
                for b, s in zip(m.buffers(), bufs):
                    b.copy_(s)


class UNet(nn.Module):
    """The U-Net skeleton; `conv` decides the kind of convolution in every DoubleConv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        upsample: str = "trilinear",
        checkpointing: bool = False,
        conv: ConvFactory = conv3d,
        deep_supervision: bool = False,
        norm: str = "batch",
    ):
        super().__init__()
        widths = list(widths)
        make_norm = norm_layer(norm)
        if len(widths) < 2:
            raise ValueError("widths needs at least two entries (one down-sampling step)")
        self.widths = widths
        self.checkpointing = checkpointing
        self.down = nn.ModuleList(
            DoubleConv(n_in, n_out, conv, make_norm) for n_in, n_out in zip([in_channels] + widths[:-1], widths)
        )
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], upsample) for i in range(len(widths) - 1))
        self.merge = nn.ModuleList(DoubleConv(2 * w, w, conv, make_norm) for w in widths[:-1])
        self.head = nn.Conv3d(widths[0], out_channels, kernel_size=1)
        # Heads of decoder levels 1 .. depth-2 (the bottleneck gets none, as in nnU-Net).
        self.ds_heads = nn.ModuleList(
            nn.Conv3d(w, out_channels, kernel_size=1) for w in widths[1:-1]
        ) if deep_supervision else None

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # Trade compute for memory: activations inside the block are recomputed in backward.
            return checkpoint(
                block,
                x,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _frozen_batchnorm_stats(block)),
            )
        return block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.size_multiple
        size = tuple(x.shape[2:])
        if len(size) != 3 or any(s % m for s in size):
            raise ValueError(
                f"input spatial size {size} is not a multiple of {m} on every axis "
                f"(a U-Net with {len(self.widths)} levels halves the size {len(self.widths) - 1} times)"
            )
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = self._block(block, x)
            skips.append(x)
        x = skips.pop()
        supervise = self.ds_heads is not None and self.training
        lower: list[torch.Tensor] = []
        for i in reversed(range(len(self.up))):
            x = torch.cat([skips.pop(), self.up[i](x)], dim=1)
            x = self._block(self.merge[i], x)
            if supervise and i >= 1:
                lower.append(self.ds_heads[i - 1](x))
        if supervise:
            return [self.head(x), *reversed(lower)]
        return self.head(x)


class UNet3D(UNet):
    """The classic 3D U-Net with 3x3x3 convolutions."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        upsample: str = "trilinear",
        checkpointing: bool = False,
        deep_supervision: bool = False,
        norm: str = "batch",
    ):
        super().__init__(in_channels, out_channels, widths, upsample, checkpointing, conv=conv3d,
                         deep_supervision=deep_supervision, norm=norm)


class UNet2Plus1D(UNet):
    """The same U-Net with every 3x3x3 conv factored into (3,3,1) then (1,1,3) (through-plane = Z).

    `mid_channels=None` picks Tran et al.'s parameter-matched width per conv (`mid_width`);
    an int fixes the intermediate width of every factored conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        upsample: str = "trilinear",
        checkpointing: bool = False,
        mid_channels: int | None = None,
        deep_supervision: bool = False,
        norm: str = "batch",
    ):
        make_norm = norm_layer(norm)

        def conv(n_in: int, n_out: int) -> nn.Module:
            return Conv2Plus1D(n_in, n_out, mid_channels, make_norm)

        super().__init__(in_channels, out_channels, widths, upsample, checkpointing, conv=conv,
                         deep_supervision=deep_supervision, norm=norm)


def size_multiple(cfg: ModelConfig) -> int:
    """Every spatial input size must be a multiple of this: 2 ** (len(widths) - 1)."""
    return 2 ** (len(cfg.widths) - 1)


DS_PREFIX = "ds_heads."


def build_model(cfg: ModelConfig, in_channels: int, for_inference: bool = False) -> nn.Module:
    """The network `cfg` describes; returns logits (B, cfg.out_channels, X, Y, Z).

    `for_inference` leaves out the deep-supervision heads (they only shape training); load
    a training state dict into such a model with `inference_state_dict`.
    """
    common = dict(
        in_channels=in_channels,
        out_channels=cfg.out_channels,
        widths=cfg.widths,
        upsample=cfg.upsample,
        checkpointing=cfg.checkpointing,
        norm=cfg.norm,
        deep_supervision=cfg.deep_supervision and not for_inference and len(cfg.widths) > 2,
    )
    if cfg.architecture == "unet3d":
        return UNet3D(**common)
    if cfg.architecture == "unet2plus1d":
        return UNet2Plus1D(**common, mid_channels=cfg.mid_channels)
    raise ValueError(f"unknown architecture {cfg.architecture!r} (unet3d or unet2plus1d)")


def inference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training state dict without the deep-supervision heads' weights."""
    return {k: v for k, v in state.items() if not k.startswith(DS_PREFIX)}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
