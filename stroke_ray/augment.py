"""Training-time augmentation of a whole batch on the training device (GPU when present).

    image, mask = augment_batch(image, mask, cfg.augment, generator=step_generator(...), air=air)

takes a (B, C, X, Y, Z) float image and its (B, 1, X, Y, Z) 0/1 mask, already on the
device, and returns both transformed with one random draw per sample: spatial transforms
first (stroke_ray.augment_spatial: rotation, scaling and elastic deformation composed into
one resampling, then flips), intensity transforms after (stroke_ray.augment_intensity).
The mask stays binary, in the image's dtype and aligned with it; `none` returns the inputs
unchanged. What each preset does and every setting: docs/training.md ("Augmentation").

Randomness comes only from the `torch.Generator` passed in; `step_generator` seeds one from
the run's seed, the worker's rank and the global step, so a run (and a resumed run) draws
the same augmentations again.
"""

from __future__ import annotations

import numpy as np
import torch

from stroke_ray.augment_config import AugmentConfig
from stroke_ray.augment_intensity import intensity_transform
from stroke_ray.augment_spatial import flip_batch, spatial_transform

__all__ = ["augment_batch", "default_air", "step_generator"]


def step_generator(device: torch.device | str, seed: int, rank: int, step: int) -> torch.Generator:
    """A generator on `device` seeded from (seed, rank, step): distinct per worker and step."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def default_air(image: torch.Tensor) -> torch.Tensor:
    """(B, C) each channel's minimum over the patch: the air value when none is given."""
    return image.flatten(2).amin(2)


def augment_batch(
    image: torch.Tensor,
    mask: torch.Tensor,
    cfg: AugmentConfig,
    *,
    generator: torch.Generator,
    air: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a training batch on its device.

    Args:
        image: (B, C, X, Y, Z) floating-point image.
        mask: (B, 1, X, Y, Z) 0/1 mask (any dtype; kept).
        cfg: the augmentation config (a preset and per-transform settings; resolved here).
        generator: a `torch.Generator` on the batch's device (see `step_generator`).
        air: (B, C) or (C,) per-channel value to fill outside the source patch (the
            normalised value of raw 0); default: each channel's minimum in the patch.
    Returns:
        (image, mask), new tensors of the same shapes and dtypes; the inputs themselves
        when nothing was drawn (always so for the `none` preset).
    Raises:
        ValueError: on shapes that do not match, or a generator on another device.
    """
    if image.ndim != 5 or mask.ndim != 5 or mask.shape[1] != 1 or image.shape[2:] != mask.shape[2:]:
        raise ValueError(f"augment_batch: want image (B, C, X, Y, Z) and mask (B, 1, X, Y, Z), "
                         f"got {tuple(image.shape)} and {tuple(mask.shape)}")
    if generator.device.type != image.device.type:
        raise ValueError(f"augment_batch: generator on {generator.device}, batch on {image.device}")
    cfg = cfg.resolved()
    b, c = image.shape[:2]
    air = default_air(image) if air is None else air.to(image.device, image.dtype)
    air = air.expand(b, c) if air.ndim == 1 else air
    image, mask = spatial_transform(image, mask, air, cfg, generator)
    image, mask = flip_batch(image, mask, cfg.flip.p, generator)
    image = intensity_transform(image, air, cfg, generator)
    return image, mask
