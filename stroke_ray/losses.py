"""Segmentation losses: soft Dice, generalized Dice, cross-entropy, and their sums.

Every loss takes logits (B, K, X, Y, Z) and a target (B, 1, X, Y, Z):

* K == 1 (binary head): probabilities p = sigmoid(logits), target holds {0, 1} floats;
  the cross-entropy term is BCE-with-logits. Generalized Dice is computed over the two
  classes (background 1-p, foreground p), so it is not degenerate on a single channel.
* K > 1 (multi-class head): p = softmax(logits), target holds class indices; the
  cross-entropy term is `nn.CrossEntropyLoss` on those indices.

Names (all reductions are over the whole batch, see docs/losses.md for the formulas):

    dice        1 - soft Dice over the foreground class(es)
    gdl         generalized Dice loss (Crum et al. 2006, weights 1/(sum ref)^2) over all classes
    ce, bce     the head's cross-entropy (BCE for K == 1, softmax CE for K > 1; same term)
    dice_bce    dice + cross-entropy  (identical to dice_ce: both names are kept for configs)
    dice_ce     dice + cross-entropy
    gdl_ce      gdl + cross-entropy
    gdl_ce_log  -ln(generalized Dice score) + cross-entropy
                (the logarithmic Dice term of Wong et al. 2018 with gamma = 1, applied to GDS)

The Dice and GDL terms are written out here (a few lines each) and checked against MONAI's
DiceLoss / GeneralizedDiceLoss / DiceCELoss in tests/test_losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOG_FLOOR",
    "SMALL_LESION_WINDOW",
    "LOSS_NAMES",
    "SMOOTH_DR",
    "SMOOTH_NR",
    "build_loss",
    "class_probabilities",
    "cross_entropy",
    "generalized_dice_score",
    "soft_dice_loss",
    "small_lesion_weights",
    "SegmentationLoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
    "downsample_target",
]

SMOOTH_NR = 1e-5  # added to the Dice numerator: the score of an empty prediction on an empty target is 1
SMOOTH_DR = 1e-5  # added to the Dice denominator: no division by zero when both are empty
LOG_FLOOR = 1e-7  # ln() of the score is taken at no less than this, to stay finite
SMALL_LESION_WINDOW = 7  # voxels: the neighbourhood whose lesion share stands for a lesion's size

LOSS_NAMES = ("dice_bce", "gdl_ce", "gdl_ce_log", "dice_ce", "dice", "bce", "gdl", "ce")


def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (autocast-safe) and a (B, 1, ...) target."""
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape[1] != 1 or target.shape[2:] != logits.shape[2:] or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            "expected (B, 1, X, Y, Z)"
        )
    return logits.float(), target


def class_probabilities(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class probabilities and one-hot target, both (B, C, ...); C = 2 for a binary head
    (channel 0 = background 1-p, channel 1 = foreground p), C = K otherwise."""
    logits, target = _prepare(logits, target)
    k = logits.shape[1]
    if k == 1:
        p = torch.sigmoid(logits)
        t = target.float()
        return torch.cat([1 - p, p], dim=1), torch.cat([1 - t, t], dim=1)
    p = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target[:, 0].long(), k).movedim(-1, 1).to(p.dtype)
    return p, onehot


def _sums(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class intersection, prediction sum and reference sum over batch and space."""
    axes = [0] + list(range(2, p.dim()))
    return (p * t).sum(axes), p.sum(axes), t.sum(axes)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth_nr: float = SMOOTH_NR, smooth_dr: float = SMOOTH_DR
) -> torch.Tensor:
    """1 - mean over foreground classes c of (2 sum p_c t_c + s_nr) / (sum p_c + sum t_c + s_dr)."""
    p, t = class_probabilities(logits, target)
    inter, psum, tsum = _sums(p[:, 1:], t[:, 1:])  # channel 0 is background
    return 1 - ((2 * inter + smooth_nr) / (psum + tsum + smooth_dr)).mean()


def generalized_dice_score(
    logits: torch.Tensor, target: torch.Tensor, smooth_nr: float = SMOOTH_NR, smooth_dr: float = SMOOTH_DR
) -> torch.Tensor:
    """GDS = (2 sum_c w_c sum p_c t_c + s_nr) / (sum_c w_c (sum p_c + sum t_c) + s_dr), w_c = 1/(sum t_c)^2.

    A class absent from the target would get an infinite weight; like MONAI it gets the
    largest finite weight instead. The weights are then scaled to sum to 1: the ratio does not
    change, but the smoothing constants stay small next to the weighted sums (raw 1/(sum t)^2
    weights make them ~1/voxels, and a smoothing of 1e-5 would dominate; see docs/losses.md)."""
    p, t = class_probabilities(logits, target)
    inter, psum, tsum = _sums(p, t)
    w = 1.0 / (tsum * tsum)
    absent = torch.isinf(w)
    w = torch.where(absent, torch.zeros_like(w), w)
    w = w + absent * w.max()
    w = w / w.sum()
    return (2 * (w * inter).sum() + smooth_nr) / ((w * (psum + tsum)).sum() + smooth_dr)


def small_lesion_weights(target: torch.Tensor, max_weight: float, window: int = SMALL_LESION_WINDOW,
                         full_share: float = 0.5) -> torch.Tensor:
    """Per-voxel cross-entropy weights (B, 1, ...) that make a small lesion count as much as
    a large one's boundary.

    A lesion voxel's weight is `full_share / d`, clipped to [1, max_weight], where d is the
    lesion share of the `window`^3 neighbourhood around it: voxels inside or along a large
    lesion (d >= full_share) keep weight 1, a lesion of a few voxels gets up to `max_weight`.
    Background voxels weigh 1. The local share stands in for the lesion's size without
    labelling components, so it runs on the training device after augmentation, and a soft
    target (deep supervision's lower outputs) weighs in proportion to its lesion fraction.
    """
    t = target.float()
    share = F.avg_pool3d(t, window, stride=1, padding=window // 2, count_include_pad=True)
    boost = (full_share / share.clamp_min(1e-6)).clamp(1.0, float(max_weight))
    return 1.0 + (boost - 1.0) * t.clamp(0.0, 1.0)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, small_lesion_weight: float = 1.0) -> torch.Tensor:
    """BCE-with-logits for a binary head; softmax cross-entropy on class indices otherwise.
    (CrossEntropyLoss on a single channel is identically zero, hence the split.)

    `small_lesion_weight` > 1 weighs each voxel by `small_lesion_weights` (foreground = any
    class but 0), the mean taken over voxels as without weights."""
    logits, target = _prepare(logits, target)
    weight = None
    if small_lesion_weight > 1.0:
        foreground = target.float() if logits.shape[1] == 1 else (target > 0).float()
        weight = small_lesion_weights(foreground, small_lesion_weight)
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, target.float(), weight=weight)
    voxel_ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none")
    return voxel_ce.mean() if weight is None else (voxel_ce * weight[:, 0]).mean()


class SegmentationLoss(nn.Module):
    """Sum of a region term (none, Dice, GDL or -ln GDS) and an optional cross-entropy term."""

    def __init__(
        self,
        region: str | None,
        use_ce: bool,
        smooth_nr: float = SMOOTH_NR,
        smooth_dr: float = SMOOTH_DR,
        small_lesion_weight: float = 1.0,
    ):
        super().__init__()
        if region not in (None, "dice", "gdl", "gdl_log"):
            raise ValueError(f"unknown region term {region!r}")
        if small_lesion_weight < 1.0:
            raise ValueError(f"small_lesion_weight must be >= 1 (1 = plain cross-entropy), got {small_lesion_weight}")
        self.region, self.use_ce = region, use_ce
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr
        self.small_lesion_weight = float(small_lesion_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.region == "dice":
            loss = loss + soft_dice_loss(logits, target, self.smooth_nr, self.smooth_dr)
        elif self.region == "gdl":
            loss = loss + 1 - generalized_dice_score(logits, target, self.smooth_nr, self.smooth_dr)
        elif self.region == "gdl_log":
            gds = generalized_dice_score(logits, target, self.smooth_nr, self.smooth_dr)
            loss = loss - torch.log(gds.clamp_min(LOG_FLOOR))
        if self.use_ce:
            loss = loss + cross_entropy(logits, target, self.small_lesion_weight)
        return loss

    def extra_repr(self) -> str:
        return (f"region={self.region}, ce={self.use_ce}, smooth_nr={self.smooth_nr}, smooth_dr={self.smooth_dr}, "
                f"small_lesion_weight={self.small_lesion_weight}")


_TERMS: dict[str, tuple[str | None, bool]] = {
    "dice_bce": ("dice", True),
    "dice_ce": ("dice", True),
    "gdl_ce": ("gdl", True),
    "gdl_ce_log": ("gdl_log", True),
    "dice": ("dice", False),
    "gdl": ("gdl", False),
    "bce": (None, True),
    "ce": (None, True),
}


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights of n outputs (full resolution first): 1, 1/2, 1/4, ..., the lowest
    resolution's set to 0, normalised to sum to 1. One output gets weight 1."""
    if n <= 1:
        return [1.0]
    raw = [0.5**i for i in range(n)]
    raw[-1] = 0.0
    total = sum(raw)
    return [w / total for w in raw]


def downsample_target(target: torch.Tensor, size: tuple[int, ...], out_channels: int) -> torch.Tensor:
    """The (B, 1, ...) target at a lower output's `size`.

    A binary target is area-averaged (a soft target: a lesion smaller than a coarse voxel
    keeps its share instead of vanishing); class indices of a softmax head are sampled
    nearest, as nnU-Net does."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    if out_channels == 1:
        return F.adaptive_avg_pool3d(target.float(), size)
    return F.interpolate(target.float(), size=size, mode="nearest")


class DeepSupervisionLoss(nn.Module):
    """`loss` on every output of a deep-supervised network, weighted as nnU-Net does.

    Takes the list [full, 1/2, 1/4, ...] of logits a deep-supervised network returns in
    training mode (a single tensor is passed straight to `loss`) and the full-size target,
    which is downsampled to each output (`downsample_target`).
    """

    def __init__(self, loss: nn.Module, out_channels: int = 1):
        super().__init__()
        self.loss = loss
        self.out_channels = out_channels

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(outputs):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        # Every output enters the sum, the zero-weighted one too: DDP expects a gradient
        # (here 0) for every parameter, including that output's head.
        for weight, logits in zip(weights, outputs):
            small = downsample_target(target, tuple(logits.shape[2:]), self.out_channels)
            total = total + weight * self.loss(logits, small)
        return total


def build_loss(name: str, out_channels: int = 1, small_lesion_weight: float = 1.0, **smoothing: float) -> nn.Module:
    """The loss `name` (see the module docstring) for a head with `out_channels` outputs.

    `small_lesion_weight` > 1 weighs the cross-entropy term's lesion voxels by how small their
    lesion is (`small_lesion_weights`); `smoothing` may set smooth_nr / smooth_dr of the Dice
    and GDL terms."""
    if name not in _TERMS:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels}")
    region, use_ce = _TERMS[name]
    # Wrapped so that a deep-supervised network's list of outputs is accepted as well.
    return DeepSupervisionLoss(SegmentationLoss(region, use_ce, small_lesion_weight=small_lesion_weight, **smoothing),
                               out_channels)
