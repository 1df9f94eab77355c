"""Augmentation cost: training-step time with augmentation vs none, and per-library cost per batch.

Part 1, the target: a full training step (augmentation + forward + backward + AdamW step of
the unet3d in the shipped train_example config, widths 16-32-64-128, 3 channels, 64^3, batch 2,
DiceBCE) with each augmentation setting (`none`, `light`, `strong`, `strong` + elastic),
interleaved round by round in a rotating order, so that the machine's load hits all alike.
Target: `strong` within 1.15x of `none` (ratio of median step times).

Part 2, the choice of library: the time one batch's augmentation takes with
  - ours       stroke_ray.augment (batched torch ops on the batch's device);
  - bgv2       batchgeneratorsv2 with nnU-Net v2's default training transforms, per sample;
  - monai      MONAI dictionary transforms, the same pipeline per sample;
  - kornia     kornia.augmentation 3D (spatial only: it has no 3D intensity transforms),
               batched;
each with nnU-Net's probabilities ("default") and with every transform on every sample
("all": the worst case), plus our per-transform costs with p = 1. Missing libraries are
skipped with a note (`pip install batchgeneratorsv2 kornia`; MONAI is a dependency).

    .venv/bin/python benchmarks/bench_augment.py --rounds 12 --aug-rounds 20 --clock cpu

One torch thread by default: a Ray Train worker gets `cpus_per_worker` CPUs (1 unless set)
and Ray sets OMP_NUM_THREADS to match.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from stroke_ray.augment import augment_batch, step_generator
from stroke_ray.augment_config import AugmentConfig

SETTINGS = {
    "none": AugmentConfig(preset="none"),
    "light": AugmentConfig(preset="light"),
    "strong": AugmentConfig(preset="strong"),
    "strong+elastic": AugmentConfig(preset="strong", elastic={"p": 0.2}),
}
TRANSFORMS = ("flip", "rotation", "scale", "elastic", "bias_field", "noise", "blur",
              "brightness", "contrast", "low_res", "thick_slices", "gamma")


def everything() -> AugmentConfig:
    per_channel = {"p": 1.0, "p_per_channel": 1.0}
    return AugmentConfig(
        preset="strong", flip={"p": 0.5}, rotation={"p": 1.0}, scale={"p": 1.0}, elastic={"p": 1.0},
        noise={"p": 1.0}, gamma={"p": 1.0, "p_inverted": 1.0}, thick_slices={"p": 1.0},
        **{n: per_channel for n in ("bias_field", "blur", "brightness", "contrast", "low_res")},
    )


def only(name: str) -> AugmentConfig:
    extra = {"p_per_channel": 1.0} if name in ("bias_field", "blur", "brightness", "contrast", "low_res") else {}
    if name == "gamma":
        extra = {"p_inverted": 0.0}
    return AugmentConfig(preset="none", **{name: {"p": 1.0, **extra}})


def make_batch(batch: int, channels: int, size: int, seed: int = 0):
    """A head-like batch: a bright ellipsoid 'brain' in air (z-scored-like), a lesion blob."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.linspace(-1, 1, size)
    x, y, z = torch.meshgrid(axes, axes, axes, indexing="ij")
    brain = ((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.7) ** 2) <= 1
    lesion = ((x - 0.3) ** 2 + (y + 0.2) ** 2 + z**2) <= 0.15**2
    image = torch.randn((batch, channels, size, size, size), generator=g) * 0.2
    image = image + brain.float() * 2.0 + lesion.float() * 1.5 - 1.0
    mask = lesion.float().expand(batch, 1, size, size, size).clone()
    air = torch.full((batch, channels), -1.0)
    return image, mask, air


# --- candidate pipelines (nnU-Net v2's defaults, or everything with p = 1) -----------------


def ours(cfg: AugmentConfig):
    def run(image, mask, air, step):
        return augment_batch(image, mask, cfg, generator=step_generator(image.device, 0, 0, step), air=air)

    return run


def bgv2(size: int, p_all: bool):
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    def p(x: float) -> float:
        return 1.0 if p_all else x

    # nnUNetTrainer.get_training_transforms (nnU-Net v2), 3D, no deep supervision
    rot = (-30 / 360 * 2 * math.pi, 30 / 360 * 2 * math.pi)
    pipeline = ComposeTransforms([
        SpatialTransform((size,) * 3, 0, False, p_elastic_deform=p(0), p_rotation=p(0.2), rotation=rot,
                         p_scaling=p(0.2), scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1,
                         bg_style_seg_sampling=False, mode_seg="bilinear"),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=p(0.1)),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=False),
                        apply_probability=p(0.2)),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=p(0.15)),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=p(0.15)),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=p(0.25)),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=p(0.1)),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=p(0.3)),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ])

    def run(image, mask, air, step):
        outs = [pipeline(image=image[i], segmentation=mask[i]) for i in range(image.shape[0])]
        return torch.stack([o["image"] for o in outs]), torch.stack([o["segmentation"] for o in outs])

    return run


def monai(p_all: bool):
    from monai import transforms as mt

    def p(x: float) -> float:
        return 1.0 if p_all else x

    keys = ["image", "label"]
    rad = math.radians(30)
    pipeline = mt.Compose([
        mt.RandAffined(keys, prob=p(0.36), rotate_range=(rad, rad, rad), scale_range=((-0.3, 0.4),) * 3,
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
        mt.RandGaussianNoised("image", prob=p(0.1), std=0.1**0.5),
        mt.RandGaussianSmoothd("image", prob=p(0.2), sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        mt.RandScaleIntensityd("image", prob=p(0.15), factors=0.25),
        mt.RandScaleIntensityFixedMeand("image", prob=p(0.15), factors=0.25, preserve_range=True),
        mt.RandSimulateLowResolutiond("image", prob=p(0.25), zoom_range=(0.5, 1.0)),
        mt.RandAdjustContrastd("image", prob=p(0.1), gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        mt.RandAdjustContrastd("image", prob=p(0.3), gamma=(0.7, 1.5), retain_stats=True),
        mt.RandBiasFieldd("image", prob=p(0.1)),
        *(mt.RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)),
    ])
    pipeline.set_random_state(0)

    def run(image, mask, air, step):
        outs = [pipeline({"image": image[i], "label": mask[i]}) for i in range(image.shape[0])]
        return (torch.stack([torch.as_tensor(o["image"]) for o in outs]),
                torch.stack([torch.as_tensor(o["label"]) for o in outs]))

    return run


def kornia(p_all: bool):
    import kornia.augmentation as K

    def p(x: float) -> float:
        return 1.0 if p_all else x

    # AugmentationSequential refuses 3D masks ("not yet supported"): the mask rides along as
    # an extra channel instead, so each sample's draw moves image and mask alike.
    pipeline = torch.nn.Sequential(
        K.RandomAffine3D(degrees=30.0, scale=(0.7, 1.4), p=p(0.36)),
        K.RandomHorizontalFlip3D(p=0.5), K.RandomVerticalFlip3D(p=0.5), K.RandomDepthicalFlip3D(p=0.5),
    )

    def run(image, mask, air, step):
        out = pipeline(torch.cat([image, mask], 1))
        return out[:, :-1], (out[:, -1:] >= 0.5).to(mask.dtype)

    return run


def candidates(size: int) -> dict:
    """name -> augmentation function; libraries that are not installed are skipped."""
    out = {"ours default (strong)": ours(SETTINGS["strong"]), "ours all": ours(everything())}
    for name, build in (("bgv2", lambda a: bgv2(size, a)), ("monai", monai), ("kornia spatial", kornia)):
        try:
            out[f"{name} default"], out[f"{name} all"] = build(False), build(True)
        except ImportError as exc:
            print(f"# {name}: skipped, not installed ({exc.name})")
    out["ours spatial default"] = ours(AugmentConfig(preset="none", flip={"p": 0.5}, rotation={"p": 0.2},
                                                     scale={"p": 0.2}))
    out["ours spatial all"] = ours(AugmentConfig(preset="none", flip={"p": 0.5}, rotation={"p": 1.0},
                                                 scale={"p": 1.0}))
    for name in TRANSFORMS:
        out[f"ours only {name}"] = ours(only(name))
    return out


# --- timing ----------------------------------------------------------------------------------


# Wall time by default; `--clock cpu` times the CPU this process used instead, which on a
# machine shared with other jobs is far less sensitive to how often the scheduler ran us.
clock = time.perf_counter


def timed(fn) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def train_steps(args) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    from stroke_ray.config import ModelConfig
    from stroke_ray.losses import build_loss
    from stroke_ray.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="unet3d", widths=args.widths), args.channels).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss("dice_bce")
    image, mask, air = make_batch(args.batch, args.channels, args.size)

    def step(cfg: AugmentConfig, i: int) -> tuple[float, float]:
        """One training step; returns (step, augmentation) time."""
        t0 = clock()
        x, y = augment_batch(image, mask, cfg, generator=step_generator("cpu", 0, 0, i), air=air)
        t1 = clock()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return clock() - t0, t1 - t0

    step(SETTINGS["strong"], 10_000)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    aug: dict[str, list[float]] = {k: [] for k in SETTINGS}
    names = list(SETTINGS)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            step_s, aug_s = step(SETTINGS[name], r)
            times[name].append(step_s)
            aug[name].append(aug_s)
        print(f"# round {r}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names), flush=True)
    return times, aug


def augment_times(args) -> dict[str, list[float]]:
    image, mask, air = make_batch(args.batch, args.channels, args.size)
    runs = candidates(args.size)
    for fn in runs.values():
        fn(image, mask, air, 10_000)  # warm-up (imports, kernels)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.aug_rounds):
        for name, fn in runs.items():
            times[name].append(timed(lambda: fn(image, mask, air, r)))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved training steps per setting")
    ap.add_argument("--aug-rounds", type=int, default=30, help="augmentation calls per candidate")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or CPU time of this process (steadier on a busy machine)")
    args = ap.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"# clock: {args.clock}, torch threads: {args.threads}")
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    print(f"# load average before: {open('/proc/loadavg').read().strip()}")

    if not args.skip_train:
        times, aug = train_steps(args)
        base, base_mean = statistics.median(times["none"]), statistics.fmean(times["none"])
        # Two views of the same run: whole-step ratios (what the target names; noisy on a busy
        # machine) and the augmentation's own time inside those steps over the `none` step.
        print("\n| augmentation | median step s | mean step s | x none (median) | x none (mean) "
              "| augmentation in the step, median ms | 1 + augmentation / none step |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, ts in times.items():
            med, mean, a = statistics.median(ts), statistics.fmean(ts), statistics.median(aug[name])
            print(f"| {name} | {med:.3f} | {mean:.3f} | {med / base:.3f} | {mean / base_mean:.3f} "
                  f"| {1000 * a:.1f} | {1 + a / base:.3f} |")

    times = augment_times(args)
    print(f"\n| augmentation of one batch ({args.batch} x {args.channels} x {args.size}^3) | median ms | mean ms |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {1000 * statistics.median(ts):.1f} | {1000 * statistics.fmean(ts):.1f} |")
    print(f"\n# load average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
