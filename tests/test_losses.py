"""Our losses against MONAI's reference implementations, edge cases and the binary-head CE bug."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, GeneralizedDiceLoss

from stroke_ray.losses import LOSS_NAMES, SMOOTH_DR, SMOOTH_NR, build_loss, generalized_dice_score

SHAPE = (2, 6, 5, 4)  # tiny, odd spatial sizes
SMOOTH = dict(smooth_nr=SMOOTH_NR, smooth_dr=SMOOTH_DR)


def _target(kind: str, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        t = torch.randint(0, max(k, 2), (SHAPE[0], 1, *SHAPE[1:]), generator=g)
    elif kind == "empty":
        t = torch.zeros(SHAPE[0], 1, *SHAPE[1:], dtype=torch.long)
    elif kind == "full":  # every voxel is (the last) foreground class
        t = torch.full((SHAPE[0], 1, *SHAPE[1:]), max(k, 2) - 1, dtype=torch.long)
    else:
        raise AssertionError(kind)
    return t.float() if k == 1 else t


def _logits(k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(SHAPE[0], k, *SHAPE[1:], generator=g)).requires_grad_()


def _monai_gdl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI GDL on the same class probabilities: two channels (1-p, p) for a binary head.

    Without smoothing: our class weights are scaled to sum to 1, which leaves the ratio
    unchanged but not the relative size of the smoothing constants."""
    nosmooth = dict(smooth_nr=0.0, smooth_dr=0.0)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return GeneralizedDiceLoss(batch=True, **nosmooth)(torch.cat([1 - p, p], 1), torch.cat([1 - target, target], 1))
    return GeneralizedDiceLoss(softmax=True, to_onehot_y=True, batch=True, **nosmooth)(logits, target)


def _monai_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        return DiceLoss(sigmoid=True, batch=True, **SMOOTH)(logits, target)
    return DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True, **SMOOTH)(logits, target)


def _monai_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target[:, 0])


def _monai_reference(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    k = logits.shape[1]
    if name in ("dice_bce", "dice_ce"):
        if k == 1:
            return DiceCELoss(sigmoid=True, batch=True, **SMOOTH)(logits, target)
        return DiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=True, **SMOOTH)(
            logits, target
        )
    if name == "dice":
        return _monai_dice(logits, target)
    if name == "gdl":
        return _monai_gdl(logits, target)
    if name in ("ce", "bce"):
        return _monai_ce(logits, target)
    if name == "gdl_ce":
        return _monai_gdl(logits, target) + _monai_ce(logits, target)
    if name == "gdl_ce_log":
        return -torch.log(1 - _monai_gdl(logits, target)) + _monai_ce(logits, target)
    raise AssertionError(name)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["random", "empty", "full"])
def test_matches_monai_and_gradients_are_finite(name, k, kind):
    logits, target = _logits(k), _target(kind, k)
    smoothing = dict(smooth_nr=0.0, smooth_dr=0.0) if name.startswith("gdl") else {}
    ours = build_loss(name, out_channels=k, **smoothing)(logits, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about absent classes in the edge cases
        ref = _monai_reference(name, logits, target)
    assert ours.shape == ()
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-5)
    ours.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_binary_gdl_ce_is_not_constant_and_equals_gdl_plus_bce():
    """The seed used CrossEntropyLoss on one channel, which is identically zero."""
    target = _target("random", 1)
    loss = build_loss("gdl_ce", out_channels=1)
    gdl, bce = build_loss("gdl"), build_loss("bce")
    values = []
    for seed in range(3):
        logits = _logits(1, seed)
        value = loss(logits, target)
        torch.testing.assert_close(value, gdl(logits, target) + bce(logits, target))
        assert bce(logits, target) > 0.1
        values.append(value.item())
    assert max(values) - min(values) > 1e-3
    # The bug itself: softmax over one channel is 1 everywhere, so CE with a (B, 1, ...) target is 0.
    assert torch.nn.CrossEntropyLoss()(_logits(1), target) == 0
    # Confident correct logits give a loss near zero; confident wrong ones a large loss.
    good = (target * 2 - 1) * 20
    assert loss(good, target) < 1e-3 < 10 < loss(-good, target)


def test_binary_gdl_uses_both_classes():
    """With only the foreground channel, GDL of an empty target would ignore the prediction."""
    target = _target("empty", 1)
    low, high = torch.full((SHAPE[0], 1, *SHAPE[1:]), -5.0), torch.full((SHAPE[0], 1, *SHAPE[1:]), 5.0)
    assert generalized_dice_score(low, target) > 0.99
    assert generalized_dice_score(high, target) < 0.01


def test_gdl_smoothing_does_not_hide_false_positives():
    """With raw 1/(sum t)^2 weights (MONAI) the 1e-5 smoothing is of the size of the weighted
    sums of a lesion-free batch (here 2 x 32^3; GDS ~ 0.72 at 2 x 64^3), so an all-lesion
    prediction still scores well."""
    target = torch.zeros(2, 1, 32, 32, 32)
    wrong, right = torch.full_like(target, 20.0), torch.full_like(target, -20.0)
    assert generalized_dice_score(wrong, target) < 1e-3
    assert generalized_dice_score(right, target) > 0.999
    p = torch.sigmoid(wrong)
    monai_gds = 1 - GeneralizedDiceLoss(batch=True, **SMOOTH)(torch.cat([1 - p, p], 1), torch.cat([1 - target, target], 1))
    assert monai_gds > 0.2  # the behaviour avoided here


def test_gdl_smoothing_is_monai_smoothing_times_weight_sum():
    """Scaling the weights to sum 1 equals MONAI with smoothing multiplied by the raw weight sum."""
    logits, target = _logits(1), _target("random", 1)
    fg = target.sum()
    raw_weight_sum = 1 / fg**2 + 1 / (target.numel() - fg) ** 2
    p = torch.sigmoid(logits)
    scaled = {k: v * raw_weight_sum.item() for k, v in SMOOTH.items()}
    ref = GeneralizedDiceLoss(batch=True, **scaled)(torch.cat([1 - p, p], 1), torch.cat([1 - target, target], 1))
    torch.testing.assert_close(build_loss("gdl")(logits, target), ref, rtol=1e-5, atol=1e-6)


def test_log_form_is_minus_log_gds():
    logits, target = _logits(1), _target("random", 1)
    gds = generalized_dice_score(logits, target)
    expected = -torch.log(gds) + build_loss("ce")(logits, target)
    torch.testing.assert_close(build_loss("gdl_ce_log")(logits, target), expected)
    assert 0 < gds < 1


def test_bf16_logits_and_unbatched_channel_target():
    logits = _logits(1).detach().bfloat16()
    target = _target("random", 1)
    a = build_loss("dice_bce")(logits, target)
    b = build_loss("dice_bce")(logits, target[:, 0])  # (B, X, Y, Z) is accepted too
    assert a.dtype == torch.float32 and torch.isfinite(a)
    torch.testing.assert_close(a, b)


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        build_loss("focal")
    with pytest.raises(ValueError, match="does not match"):
        build_loss("dice")(_logits(1), torch.zeros(2, 1, 3, 3, 3))


def _small_and_large_lesion() -> torch.Tensor:
    t = torch.zeros(1, 1, 32, 32, 32)
    t[0, 0, 4, 4, 4] = 1.0  # a one-voxel lesion
    t[0, 0, 10:26, 10:26, 10:26] = 1.0  # a 16^3 lesion
    return t


def test_small_lesion_weights_by_lesion_size():
    from stroke_ray.losses import small_lesion_weights

    t = _small_and_large_lesion()
    w = small_lesion_weights(t, max_weight=30.0)
    assert w[0, 0, 4, 4, 4] == 30.0  # the dot: capped at max_weight
    assert w[0, 0, 18, 18, 18] == 1.0  # inside the large lesion
    assert w[0, 0, 18, 18, 10] == 1.0  # on the large lesion's face: half of its window is lesion
    assert torch.all(w[t == 0] == 1.0)  # background
    soft = small_lesion_weights(t * 0.5, max_weight=30.0)  # a soft target weighs by its fraction
    assert 1.0 < soft[0, 0, 4, 4, 4] < 30.0


@pytest.mark.parametrize("k", [1, 2])
def test_small_lesion_weight_one_is_plain_ce_and_more_lifts_the_dot(k):
    t = _small_and_large_lesion()
    target = t if k == 1 else t.long()
    logits = torch.zeros(1, k, 32, 32, 32, requires_grad=True)
    plain = build_loss("dice_ce", k)(logits, target)
    assert torch.allclose(build_loss("dice_ce", k, small_lesion_weight=1.0)(logits, target), plain)
    grads = []
    for weight in (1.0, 20.0):
        logits.grad = None
        build_loss("ce", k, small_lesion_weight=weight)(logits, target).backward()
        g = logits.grad[0, -1]
        grads.append((g[4, 4, 4].abs().item(), g[18, 18, 18].abs().item()))
    (dot_plain, big_plain), (dot_weighted, big_weighted) = grads
    assert dot_weighted == pytest.approx(20.0 * dot_plain) and big_weighted == pytest.approx(big_plain)


def test_small_lesion_weight_below_one_is_refused():
    from stroke_ray.config import ConfigError, TrainConfig

    with pytest.raises(ValueError):
        build_loss("dice_ce", 1, small_lesion_weight=0.5)
    with pytest.raises(ConfigError, match="small_lesion_weight"):
        TrainConfig.from_dict({"small_lesion_weight": 0.5})
