"""Experiment planning: patch size, batch size and network from a store's fingerprint.

In the spirit of nnU-Net's experiment planner (Isensee et al. 2021), scaled down to what
stroke-ray trains: a dataset fingerprint (median shape of a level, its spacing, channels,
lesion sizes) and a memory budget (the GPU's memory when there is one, a CPU default
otherwise) decide

* the patch: start from the median shape of the level (capped at 256^3 voxels' worth), then
  shrink the axis that is largest relative to the median shape, one pooling step at a time,
  until the estimated training memory fits the budget;
* the network depth: as many 2x poolings as keep the smallest patch edge >= 4 voxels at the
  bottleneck (at most 5), with widths base * 2^i capped at `max_width`;
* the batch size: as many patches as the budget holds (at least 2), capped so that one batch
  covers at most 5 % of the dataset's voxels, as nnU-Net does.

On a CPU without an explicit memory budget, time binds rather than memory, and the plan is
one for compute instead (`plan_for_compute`): a cube of `CPU_PATCH_MM` a side and as many of
them per step as make `CPU_STEP_VOXELS`. Many small patches a step show the network more
lesions per CPU second than one large patch does (docs/accuracy.md).

Memory is estimated from the network's activations (`estimate_training_bytes`, a voxel
count per level calibrated against measured peaks, see docs/training.md) plus the weights
and the optimizer's state. `stroke-ray plan STORE` prints the plan and writes it into a
training config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from stroke_ray.errors import StrokeRayError
from stroke_ray.grid import spacing_of
from stroke_ray.store import StrokeStore

__all__ = [
    "Fingerprint",
    "Plan",
    "fingerprint",
    "plan_training",
    "default_memory_budget",
    "estimate_training_bytes",
    "CPU_MEMORY_BUDGET",
    "CPU_PATCH_MM",
    "CPU_STEP_VOXELS",
    "plan_for_compute",
]

GIB = 1024**3
# A memory plan on a CPU (`--memory-gb` not given) uses this budget for its estimate only:
# the CPU plan is a compute plan (CPU_PATCH_MM, CPU_STEP_VOXELS).
CPU_MEMORY_BUDGET = GIB // 2
# The CPU plan: cubes of 64 mm (32 voxels at 2 mm: a small lesion with its surroundings, a
# territorial infarct in two or three patches) and 6 x 32^3 voxels a step (0.6 CPU s on 2
# cores with widths 16-128, deep supervision and strong augmentation). Measured on the
# accuracy benchmark at the same CPU budget, against the memory plan of 48 x 64 x 56 in
# batches of 2 (1.1 CPU s a step): lesions < 1 ml found 6 of 20 against 0 of 20, mean Dice
# 0.44 against 0.35 (docs/accuracy.md).
CPU_PATCH_MM = 64.0
CPU_STEP_VOXELS = 6 * 32**3
MAX_POOLINGS = 5
MIN_BOTTLENECK = 4
MAX_INITIAL_VOXELS = 256**3
MAX_BATCH_SHARE = 0.05
# Stored activations per voxel and channel of one U-Net level, forward and backward together
# (two conv + BatchNorm + ReLU blocks in the encoder, upsampling, concatenation and two more
# in the decoder), calibrated against measured peak memory on CPU (fp32); see
# docs/training.md. With mixed precision on a GPU the activations take half the bytes.
ACTIVATIONS_PER_VOXEL_CHANNEL = 16.0


@dataclass
class Fingerprint:
    """What a store holds at one level, as planning needs it."""

    store: str
    level: str
    subjects: int
    channels: int
    modalities: list[str]
    median_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    total_voxels: int
    lesion_ml_median: float
    lesion_ml_p5: float


@dataclass
class Plan:
    """A planned training set-up (the fields a training config takes, and why)."""

    level: str
    patch_size: tuple[int, int, int]
    batch_size: int
    widths: list[int]
    memory_budget_gb: float | None  # None: a compute plan (a CPU without a memory budget)
    estimated_gb: float
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def basis(self) -> str:
        """What the plan was sized by, for a reader."""
        if self.memory_budget_gb is None:
            return f"compute: {self.notes[0]}" if self.notes else "compute"
        return f"budget {self.memory_budget_gb} GiB"

    def config_updates(self) -> dict:
        """The nested TrainConfig fields this plan sets."""
        return {
            "data": {"level": self.level, "patch_size": list(self.patch_size)},
            "batch_size": self.batch_size,
            "model": {"widths": list(self.widths)},
        }

    def as_dict(self) -> dict:
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


def fingerprint(store_url: str, level: str) -> Fingerprint:
    """The fingerprint of `level` in the store at `store_url`, from its attributes only.

    Raises:
        StrokeRayError: the store cannot be opened, holds no complete subject, or lacks `level`.
    """
    try:
        store = StrokeStore.open(store_url)
    except (FileNotFoundError, ValueError) as exc:
        raise StrokeRayError(f"{store_url}: cannot open the store ({exc})") from exc
    level = str(level)
    if level not in store.levels:
        raise StrokeRayError(f"{store_url}: has no level {level!r} (levels: {', '.join(store.levels)})")
    subjects = store.subjects()
    if not subjects:
        raise StrokeRayError(f"{store_url}: holds no complete subject to plan from")
    shapes, spacings, lesions = [], [], []
    for subject in subjects:
        info = store.meta(subject)["levels"][level]
        shapes.append(info["shape"])
        spacing = spacing_of(np.asarray(info["affine"]))
        spacings.append(spacing)
        lesions.append(float(info.get("lesion_voxels", 0)) * float(np.prod(spacing)) / 1000.0)
    shapes_a = np.asarray(shapes, dtype=np.int64)
    return Fingerprint(
        store=str(store_url),
        level=level,
        subjects=len(subjects),
        channels=len(store.modalities),
        modalities=store.modalities,
        median_shape=tuple(int(v) for v in np.median(shapes_a, axis=0)),  # type: ignore[arg-type]
        spacing=tuple(round(float(v), 4) for v in np.median(np.asarray(spacings), axis=0)),  # type: ignore[arg-type]
        total_voxels=int(np.prod(shapes_a, axis=1).sum()),
        lesion_ml_median=round(float(np.median(lesions)), 3),
        lesion_ml_p5=round(float(np.percentile(lesions, 5)), 3),
    )


def default_memory_budget() -> tuple[int, str]:
    """(bytes, device): 85 % of the first GPU's memory, or the CPU default."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * 0.85), "cuda"
    return CPU_MEMORY_BUDGET, "cpu"


def widths_for(depth: int, base: int, max_width: int) -> list[int]:
    """Channels per level: base * 2^i, capped at max_width (nnU-Net: 32 .. 320)."""
    return [min(base * 2**i, max_width) for i in range(depth)]


def parameter_count(widths: list[int], channels: int, architecture: str = "unet3d") -> int:
    """Weights of the U-Net in models.py (3x3x3 convs; (2+1)D at matched width is similar)."""
    k = 27
    total, n_in = 0, channels
    for w in widths:  # encoder: two convs per level
        total += k * n_in * w + k * w * w + 4 * w
        n_in = w
    for lo, hi in zip(widths[:-1], widths[1:]):  # decoder: 1x1 up-projection + two convs
        total += hi * lo + lo + k * 2 * lo * lo + k * lo * lo + 4 * lo
    return int(total)


def estimate_training_bytes(
    patch: tuple[int, int, int],
    batch: int,
    widths: list[int],
    channels: int,
    mixed_precision: bool = False,
) -> int:
    """Estimated peak memory of one training step: activations + weights + optimizer state."""
    voxels = float(np.prod(patch))
    per_sample = sum(w * voxels / 8**i for i, w in enumerate(widths)) * ACTIVATIONS_PER_VOXEL_CHANNEL
    activation_bytes = per_sample * batch * (2 if mixed_precision else 4)
    weights = parameter_count(widths, channels)
    return int(activation_bytes + weights * 4 * 4)  # weights, gradients, two Adam moments


def _round_down(value: float, multiple: int) -> int:
    return max(multiple, int(value // multiple) * multiple)


def _depth_for(patch: tuple[int, int, int]) -> int:
    """Levels of the U-Net: poolings while the smallest edge stays >= MIN_BOTTLENECK."""
    poolings = int(math.floor(math.log2(max(1, min(patch)) / MIN_BOTTLENECK)))
    return max(2, min(MAX_POOLINGS, poolings) + 1)


def plan_training(
    fp: Fingerprint,
    memory_budget: int | None = None,
    base_width: int | None = None,
    max_width: int = 320,
    min_batch: int = 2,
    max_batch: int = 32,
) -> Plan:
    """Patch size, batch size and widths for `fp` within `memory_budget` bytes.

    Args:
        fp: the store level's fingerprint.
        memory_budget: bytes for one training step (default: `default_memory_budget()`).
        base_width: channels of the first level (default 32 on a GPU, 16 on a CPU).
        max_width: channel cap of the deeper levels.
        min_batch, max_batch: batch size bounds.

    Without a GPU and without `memory_budget`, the plan is `plan_for_compute`'s.

    Raises:
        StrokeRayError: when not even the smallest patch fits the budget.
    """
    budget, device = default_memory_budget() if memory_budget is None else (int(memory_budget), "given")
    if device == "cpu":
        return plan_for_compute(fp, base_width=base_width or 16, max_width=max_width, min_batch=min_batch,
                                max_batch=max_batch)
    base = base_width or (32 if device == "cuda" else 16)
    mixed = device == "cuda"
    median = np.asarray(fp.median_shape, dtype=np.float64)
    # Initial patch: the median shape, capped at MAX_INITIAL_VOXELS with its aspect kept.
    scale = min(1.0, (MAX_INITIAL_VOXELS / float(np.prod(median))) ** (1 / 3))
    patch = [float(v) * scale for v in median]
    notes: list[str] = []
    while True:
        depth = _depth_for(tuple(int(p) for p in patch))  # type: ignore[arg-type]
        multiple = 2 ** (depth - 1)
        rounded = tuple(_round_down(p, multiple) for p in patch)
        widths = widths_for(depth, base, max_width)
        need = estimate_training_bytes(rounded, min_batch, widths, fp.channels, mixed)  # type: ignore[arg-type]
        if need <= budget:
            break
        if max(rounded) <= 2 * MIN_BOTTLENECK:
            raise StrokeRayError(
                f"{fp.store}: a {budget / GIB:.2f} GiB memory budget is too small for even "
                f"{rounded} patches of {fp.channels} channel(s) in batches of {min_batch}"
            )
        # Shrink the axis that is largest relative to the median shape, by one pooling step.
        axis = int(np.argmax(np.asarray(rounded) / median))
        patch = list(rounded)
        patch[axis] = max(float(MIN_BOTTLENECK * 2), rounded[axis] - multiple)
        notes.append(f"shrank axis {axis} to {int(patch[axis])}")
    per_patch = estimate_training_bytes(rounded, 1, widths, fp.channels, mixed)  # type: ignore[arg-type]
    weights_bytes = parameter_count(widths, fp.channels) * 16
    fits = int((budget - weights_bytes) // max(1, per_patch - weights_bytes))
    share_cap = int(MAX_BATCH_SHARE * fp.total_voxels / float(np.prod(rounded)))
    batch = max(min_batch, min(fits, share_cap, max_batch))
    estimated = estimate_training_bytes(rounded, batch, widths, fp.channels, mixed)  # type: ignore[arg-type]
    return Plan(
        level=fp.level,
        patch_size=rounded,  # type: ignore[arg-type]
        batch_size=int(batch),
        widths=widths,
        memory_budget_gb=round(budget / GIB, 2),
        estimated_gb=round(estimated / GIB, 2),
        device=device,
        notes=notes[-3:],
    )


def plan_for_compute(
    fp: Fingerprint,
    patch_mm: float = CPU_PATCH_MM,
    step_voxels: int = CPU_STEP_VOXELS,
    base_width: int = 16,
    max_width: int = 320,
    min_batch: int = 2,
    max_batch: int = 32,
) -> Plan:
    """The CPU plan: cubes of `patch_mm` (at the level's spacing, no larger than the median
    shape, rounded down to the network's pooling multiple) and as many a step as make
    `step_voxels` voxels, within [min_batch, max_batch].

    Raises:
        StrokeRayError: a patch of fewer than 2 * MIN_BOTTLENECK voxels along an axis.
    """
    edges = [min(float(m), patch_mm / float(sp)) for m, sp in zip(fp.median_shape, fp.spacing)]
    if min(edges) < 2 * MIN_BOTTLENECK:
        raise StrokeRayError(f"{fp.store}: a {patch_mm:g} mm patch is {min(edges):.0f} voxels at level "
                             f"{fp.level}: too few for a U-Net (at least {2 * MIN_BOTTLENECK})")
    depth = _depth_for(tuple(int(e) for e in edges))  # type: ignore[arg-type]
    multiple = 2 ** (depth - 1)
    patch = tuple(_round_down(e, multiple) for e in edges)
    widths = widths_for(depth, base_width, max_width)
    batch = max(min_batch, min(max_batch, int(step_voxels // int(np.prod(patch)))))
    estimated = estimate_training_bytes(patch, batch, widths, fp.channels)  # type: ignore[arg-type]
    return Plan(
        level=fp.level,
        patch_size=patch,  # type: ignore[arg-type]
        batch_size=int(batch),
        widths=widths,
        memory_budget_gb=None,
        estimated_gb=round(estimated / GIB, 2),
        device="cpu",
        notes=[f"{patch_mm:g} mm cubes, {step_voxels} voxels a step"],
    )
