"""Intensity augmentation of a training batch, batched on its device.

Each transform picks samples with its probability `p` and, for per-channel transforms, each
channel of a picked sample with `p_per_channel`; its parameters are drawn per picked
channel. The work is done on the picked (sample, channel) rows only, so a transform that
picked nothing costs nothing. Ranges and probabilities follow nnU-Net's default pipeline.

Multiplicative changes (brightness, bias field) act on the raw signal, whose zero is the
*air* value of the normalised channel: x -> air + f (x - air). On z-scored data that is what
scaling the scanner's raw intensity by f does, and air stays air.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stroke_ray.augment_config import AugmentConfig
from stroke_ray.augment_spatial import chosen, gaussian_blur, uniform

__all__ = ["intensity_transform"]


def _rows(b: int, c: int, p: float, p_channel: float, generator: torch.Generator) -> torch.Tensor:
    """Indices into the (B*C) rows picked: sample with p, then each of its channels with p_channel."""
    sample = chosen(p, b, generator)
    channel = chosen(p_channel, b * c, generator)
    return (sample.repeat_interleave(c) & channel).nonzero().flatten()


def _stats_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def _bias_fields(n: int, shape: tuple[int, ...], strength: float, generator: torch.Generator) -> torch.Tensor:
    """(n, *shape) smooth multiplicative fields exp(cubic polynomial), as in TorchIO's RandomBiasField.

    Evaluated on a 4x coarser grid and trilinearly up-sampled (the field is smooth).
    """
    dev = generator.device
    coarse = tuple(max(4, math.ceil(e / 4)) for e in shape)
    axes = [torch.linspace(-1, 1, e, device=dev) for e in coarse]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    terms = [x**i * y**j * z**k for i in range(4) for j in range(4 - i) for k in range(4 - i - j)]
    basis = torch.stack(terms).flatten(1)  # (20, voxels)
    coeffs = uniform(-strength, strength, (n, len(terms)), generator)
    log_field = (coeffs @ basis).reshape(n, 1, *coarse)
    return torch.exp(F.interpolate(log_field, size=shape, mode="trilinear", align_corners=False))[:, 0]


def _mean_std(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and (population) std, broadcastable against rows.

    Two plain reductions: torch's Welford `std` is ~50x slower than a mean on CPU.
    """
    shape = _stats_shape(rows)
    flat = rows.flatten(1)
    mean = flat.mean(1)
    var = (flat * flat).mean(1) - mean * mean
    return mean.reshape(shape), var.clamp(min=0).sqrt().reshape(shape)


def _gamma(rows: torch.Tensor, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """nnU-Net's gamma: exponent on the [min, max]-rescaled rows, mean and std kept.

    Half the draws are below 1 and half above (as in batchgenerators), whatever the range's
    skew.
    """
    r = rows.shape[0]
    shape = _stats_shape(rows)
    below = uniform(low, min(1.0, high), (r,), generator)
    above = uniform(max(1.0, low), high, (r,), generator)
    gamma = torch.where(chosen(0.5, r, generator), below, above).reshape(shape)
    mean, std = _mean_std(rows)
    lo, hi = torch.aminmax(rows.flatten(1), dim=1)
    lo, span = lo.reshape(shape), (hi - lo).clamp(min=1e-7).reshape(shape)
    out = ((rows - lo) / span).clamp(min=0) ** gamma
    new_mean, new_std = _mean_std(out)
    # rescale to [lo, hi] and restore the statistics in one affine map
    return (out - new_mean) * (std / (new_std * span).clamp(min=1e-7) * span) + mean


def _low_res(rows: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Each row down-sampled by its zoom (nearest) and up-sampled back (trilinear)."""
    out = torch.empty_like(rows)
    shape = rows.shape[1:]
    for i in range(rows.shape[0]):
        small = [max(1, round(e * float(zoom[i]))) for e in shape]
        down = F.interpolate(rows[i][None, None], size=small, mode="nearest")
        out[i] = F.interpolate(down, size=shape, mode="trilinear", align_corners=False)[0, 0]
    return out


def _thick_slices(rows: torch.Tensor, axis: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Each (C, X, Y, Z) sample averaged over slabs of 1 / zoom voxels along its axis, then
    interpolated back (linear): what a thicker slice acquisition records of the same head."""
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        shape = list(rows.shape[2:])
        small = list(shape)
        a = int(axis[i])
        small[a] = max(1, round(shape[a] * float(zoom[i])))
        down = F.interpolate(rows[i][None], size=small, mode="area")  # slab means: partial volume
        out[i] = F.interpolate(down, size=shape, mode="trilinear", align_corners=False)[0]
    return out


def intensity_transform(
    image: torch.Tensor, air: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Bias field, noise, blur, brightness, contrast, low resolution, thick slices, gamma (in that order).

    Args:
        image: (B, C, X, Y, Z) float.
        air: (B, C) normalised value of raw 0 per channel.
        cfg: a resolved AugmentConfig.
        generator: on the batch's device.
    Returns:
        A new image tensor (the input itself when no transform picked anything).
    """
    b, c, *shape = image.shape
    rows = image.reshape(b * c, *shape)
    air_rows = air.reshape(b * c).to(image.dtype)
    changed = False

    def apply(picked: torch.Tensor, new_rows: torch.Tensor) -> None:
        nonlocal rows, changed
        if not changed:  # one copy of the batch, then in place: the caller's image is kept
            rows, changed = rows.clone(), True
        rows[picked] = new_rows

    def air_of(picked: torch.Tensor) -> torch.Tensor:
        return air_rows[picked].reshape(-1, 1, 1, 1)

    picked = _rows(b, c, cfg.bias_field.p, cfg.bias_field.p_per_channel, generator)
    if picked.numel():
        fields = _bias_fields(int(picked.numel()), tuple(shape), cfg.bias_field.strength, generator)
        a = air_of(picked)
        apply(picked, a + (rows[picked] - a) * fields)

    # noise: one std per sample, all its channels (nnU-Net synchronises channels here)
    picked = _rows(b, c, cfg.noise.p, 1.0, generator)
    std = uniform(*cfg.noise.std, (b,), generator).repeat_interleave(c)[picked]
    if picked.numel():
        noise = torch.randn((int(picked.numel()), *shape), generator=generator, device=generator.device)
        apply(picked, rows[picked] + noise * std.reshape(-1, 1, 1, 1))

    picked = _rows(b, c, cfg.blur.p, cfg.blur.p_per_channel, generator)
    sigma = uniform(*cfg.blur.sigma, (int(picked.numel()), 3), generator)
    if picked.numel():
        apply(picked, gaussian_blur(rows[picked], sigma))

    picked = _rows(b, c, cfg.brightness.p, cfg.brightness.p_per_channel, generator)
    factor = uniform(*cfg.brightness.range, (int(picked.numel()),), generator).reshape(-1, 1, 1, 1)
    if picked.numel():
        a = air_of(picked)
        apply(picked, a + (rows[picked] - a) * factor)

    # contrast about the channel mean, clipped to the channel's range (preserve_range)
    picked = _rows(b, c, cfg.contrast.p, cfg.contrast.p_per_channel, generator)
    factor = uniform(*cfg.contrast.range, (int(picked.numel()),), generator).reshape(-1, 1, 1, 1)
    if picked.numel():
        x = rows[picked]
        flat = x.flatten(1)
        mean = flat.mean(1).reshape(-1, 1, 1, 1)
        lo, hi = (v.reshape(-1, 1, 1, 1) for v in torch.aminmax(flat, dim=1))
        apply(picked, torch.minimum(torch.maximum((x - mean) * factor + mean, lo), hi))

    picked = _rows(b, c, cfg.low_res.p, cfg.low_res.p_per_channel, generator)
    zoom = uniform(*cfg.low_res.zoom, (int(picked.numel()),), generator)
    if picked.numel():
        apply(picked, _low_res(rows[picked], zoom))

    # thick slices: one axis and one zoom per picked sample, all its channels alike
    samples = chosen(cfg.thick_slices.p, b, generator).nonzero().flatten()
    axis = torch.randint(0, 3, (int(samples.numel()),), generator=generator, device=generator.device)
    zoom = uniform(*cfg.thick_slices.zoom, (int(samples.numel()),), generator)
    if samples.numel():
        picked = (samples[:, None] * c + torch.arange(c, device=samples.device)).flatten()
        slabs = _thick_slices(rows[picked].reshape(-1, c, *shape), axis, zoom)
        apply(picked, slabs.reshape(-1, *shape))

    # gamma of the inverted channel (p_inverted), then plain gamma (p), as nnU-Net does
    picked = _rows(b, c, cfg.gamma.p_inverted, 1.0, generator)
    if picked.numel():
        apply(picked, -_gamma(-rows[picked], *cfg.gamma.range, generator))
    picked = _rows(b, c, cfg.gamma.p, 1.0, generator)
    if picked.numel():
        apply(picked, _gamma(rows[picked], *cfg.gamma.range, generator))

    return rows.reshape(b, c, *shape) if changed else image
