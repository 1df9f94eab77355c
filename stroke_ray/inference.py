"""Whole-volume prediction: sliding windows with Gaussian blending, and back to native space.

The windowing, padding and blending are MONAI's `sliding_window_inference` (maintained,
tested, GPU-aware, with nnU-Net's Gaussian importance map), so this module only adds what is
ours: window sizes that respect the network's size multiple, per-window sigmoid/softmax so
that probabilities (not logits) are blended, mirroring test-time augmentation per window,
and the mapping between the reference grid and the training level grid (`grid.level_grid` +
`grid.resample`, the same path ingest uses).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from stroke_ray.config import mirror_axes
from stroke_ray.grid import NATIVE, keep_lost_components, level_grid, resample
from stroke_ray.intensity import normalise
from stroke_ray.postprocess import THRESHOLD_CANDIDATES

__all__ = [
    "ALL_AXES",
    "mirror_sets",
    "foreground_probability",
    "normalise_case",
    "predict_case",
    "sliding_window_predict",
    "window_size",
    "Prediction",
]

if TYPE_CHECKING:
    from stroke_ray.ingest import PreparedCase

Triple = tuple[int, int, int]
# Every mirroring of the three spatial axes, as nnU-Net's test-time augmentation.
ALL_AXES = (0, 1, 2)


def mirror_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial `axes` (the identity first): 2^len(axes) mirrorings.

    Raises:
        ValueError: an axis outside 0, 1, 2, or one given twice.
    """
    axes = mirror_axes(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def as_triple(size: int | tuple[int, ...] | list[int]) -> Triple:
    """A patch or window size as three edges (an int means a cube)."""
    if isinstance(size, (int, np.integer)):
        return (int(size),) * 3
    out = tuple(int(s) for s in size)
    if len(out) != 3:
        raise ValueError(f"a patch size is one int or three, got {size!r}")
    return out  # type: ignore[return-value]


def window_size(patch_size: int | tuple[int, ...], multiple: int = 1) -> Triple:
    """The window edges: `patch_size` rounded up to the network's size multiple, per axis."""
    multiple = max(1, int(multiple))
    return tuple(int(math.ceil(p / multiple) * multiple) for p in as_triple(patch_size))  # type: ignore[return-value]


def pad_to_window(x: torch.Tensor, roi: Triple, fill: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(B, C, X, Y, Z) padded at the end of short axes up to `roi`, each channel with its
    `fill` value (C,); returns the padded tensor and the slices that crop it back."""
    spatial = tuple(int(s) for s in x.shape[2:])
    target = tuple(max(s, r) for s, r in zip(spatial, roi))
    crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
    if target == spatial:
        return x, crop
    out = fill.to(x.dtype).to(x.device).reshape(1, -1, 1, 1, 1).expand(x.shape[0], x.shape[1], *target).clone()
    out[crop] = x
    return out, crop


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) foreground probability of (B, K, ...) logits: sigmoid for one channel, else
    1 - softmax of class 0 (one or more lesion classes)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return 1.0 - torch.softmax(logits, dim=1)[:, :1]


class _Probabilities(torch.nn.Module):
    """Wraps a logits network so each window yields foreground probability (B, 1, ...).

    With mirroring sets (test-time augmentation) the window is predicted once per mirroring
    and the probabilities, mirrored back, are averaged: per window, as nnU-Net does, so the
    Gaussian blending of overlapping windows works on the averaged probabilities.
    """

    def __init__(self, model: torch.nn.Module, mirrorings: Sequence[tuple[int, ...]] = ((),)):
        super().__init__()
        self.model = model
        # Spatial axis a of (X, Y, Z) is tensor dim a + 2 of (B, C, X, Y, Z).
        self.mirrorings = [tuple(a + 2 for a in axes) for axes in mirrorings]

    def _probability(self, x: torch.Tensor) -> torch.Tensor:
        return foreground_probability(self.model(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for dims in self.mirrorings:
            if dims:
                prob = torch.flip(self._probability(torch.flip(x, dims)), dims)
            else:
                prob = self._probability(x)
            total = prob if total is None else total + prob
        return total / len(self.mirrorings)


def sliding_window_predict(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    patch_size: int | tuple[int, ...],
    overlap: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    amp: bool = False,
    multiple: int = 1,
    air: np.ndarray | None = None,
    tta_axes: Sequence[int] = (),
) -> np.ndarray:
    """Foreground probability (X, Y, Z) float32 of a (C, X, Y, Z) image.

    Windows of `patch_size` (rounded up to `multiple`) overlap by `overlap`; their
    probabilities are blended with a Gaussian weight (sigma = 1/8 of the window, as nnU-Net).
    Volumes smaller than a window are padded with each channel's `air` value (the normalised
    value of raw 0, as training patches are padded; default 0) and cropped back.

    Args:
        tta_axes: spatial axes (0, 1, 2 = X, Y, Z) to mirror for test-time augmentation:
            every window is predicted under all 2^len(tta_axes) mirrorings and the
            probabilities averaged; () = no augmentation.

    Raises:
        ValueError: `image` is not (C, X, Y, Z), or bad `patch_size` / `tta_axes`.
    """
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if x.ndim != 4:
        raise ValueError(f"sliding_window_predict expects (C, X, Y, Z), got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)[None]
    roi = window_size(patch_size, multiple)
    fill = torch.zeros(x.shape[1]) if air is None else torch.as_tensor(np.asarray(air, np.float32).reshape(-1))
    x, crop = pad_to_window(x, roi, fill)
    from monai.inferers import sliding_window_inference

    predictor = _Probabilities(model, mirror_sets(tta_axes))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, amp):
            prob = sliding_window_inference(
                x,
                roi_size=roi,
                sw_batch_size=int(batch_size),
                predictor=predictor,
                overlap=float(overlap),
                mode="gaussian",
                padding_mode="constant",
                cval=0.0,
                sw_device=device,
                device=device,
            )
    finally:
        model.train(was_training)
    return prob[crop][0, 0].float().cpu().numpy().astype(np.float32, copy=False)


@dataclass
class Prediction:
    """A case's prediction on its reference (native) grid.

    `level_probability` / `level_affine` hold the probability on the training level's grid
    before it was mapped back (None for the native level), for scoring at that level.
    """

    probability: np.ndarray  # (X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # 4x4 of the reference grid
    level_probability: np.ndarray | None = None
    level_affine: np.ndarray | None = None


def normalise_case(image: np.ndarray, attrs: dict[str, Any], normalization: str = "zscore") -> np.ndarray:
    """Apply the training normalisation to a (C, ...) image with the case's own stats."""
    return normalise(np.asarray(image, dtype=np.float32), normalization, attrs.get("norm") if attrs else None)


def air_value(attrs: dict[str, Any], channels: int, normalization: str = "zscore") -> np.ndarray:
    """The normalised value of raw 0 (air, outside the brain) per channel: what padding uses."""
    return normalise_case(np.zeros((channels, 1, 1, 1), np.float32), attrs, normalization).reshape(-1)


def predict_case(
    model: torch.nn.Module,
    case: PreparedCase,
    level: str,
    patch_size: int | tuple[int, ...],
    normalization: str = "zscore",
    overlap: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    multiple: int = 1,
    amp: bool = False,
    tta_axes: Sequence[int] = (),
) -> Prediction:
    """Predict one case at the training `level` and return it on the case's reference grid.

    The raw image goes onto the level grid exactly as ingest put the training data there
    (`grid.level_grid`, linear, anti-aliased, zero outside the field of view), is then
    normalised, predicted, and the probability is resampled linearly back to the reference
    grid (zero outside a cropped level's box). The mask is probability >= threshold.
    `tta_axes` mirrors as in `sliding_window_predict`.
    """
    ref_shape = tuple(int(s) for s in case.image.shape[1:])
    ref_affine = np.asarray(case.affine, dtype=np.float64)
    level = str(level)
    level_affine = None
    if level == NATIVE:
        image = case.image
    else:
        level_shape, level_affine = level_grid(level, ref_shape, ref_affine, image=case.image)
        image = np.stack(
            [resample(c, ref_affine, level_shape, level_affine, order=1, antialias=True) for c in case.image]
        )
    image = normalise_case(image, case.attrs, normalization)
    level_prob = sliding_window_predict(
        model, image, patch_size, overlap=overlap, batch_size=batch_size,
        device=device, amp=amp, multiple=multiple,
        air=air_value(case.attrs, image.shape[0], normalization), tta_axes=tta_axes,
    )
    if level_affine is None:
        prob, level_prob = level_prob, None
    else:
        prob = resample(level_prob, level_affine, ref_shape, ref_affine, order=1, antialias=True)
        prob = np.clip(prob, 0.0, 1.0)
        # A lesion found at the level stays a lesion on the case's grid, however small: at
        # this threshold and at every one validation may choose (highest first, so each
        # lift is kept by the lower ones).
        for line in sorted({float(threshold), *THRESHOLD_CANDIDATES}, reverse=True):
            keep_lost_components(level_prob, level_affine, prob, ref_affine, threshold=line)
    prob = prob.astype(np.float32, copy=False)
    return Prediction(
        probability=prob, mask=(prob >= threshold).astype(np.uint8), affine=ref_affine.copy(),
        level_probability=level_prob, level_affine=level_affine,
    )
