"""Benchmark 4: whole-volume inference on the real ISLES'22 sample case.

stroke-ray's sliding_window_predict vs MONAI's sliding_window_inference called directly
(same randomly initialised unet3d, same window, overlap, batch and Gaussian blending; MONAI's
logits go through a sigmoid afterwards). Both run --rounds times interleaved and keep their
best time, since the machine may be shared. Target: ours no slower (ratio <= ~1).

    .venv/bin/python benchmarks/bench_inference.py [--widths 8 16 32] [--patch 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from stroke_ray.config import ModelConfig
from stroke_ray.inference import normalise_case, predict_case, sliding_window_predict
from stroke_ray.ingest import load_case
from stroke_ray.models import build_model, size_multiple

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isles22-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    raw = args.sample / "rawdata" / "sub-strokecase0009" / "ses-0001"
    images = {m: raw / f"sub-strokecase0009_ses-0001_{m}.nii.gz" for m in ("dwi", "adc", "flair")}
    case = load_case(images, subject="sub-strokecase0009")
    image = normalise_case(case.image, case.attrs)
    cfg = ModelConfig(widths=args.widths)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=image.shape[0]).eval()
    multiple = size_multiple(cfg)

    from monai.inferers import sliding_window_inference

    def ours() -> np.ndarray:
        return sliding_window_predict(model, image, args.patch, overlap=args.overlap,
                                      batch_size=args.batch, multiple=multiple)

    def monai_direct() -> np.ndarray:
        with torch.inference_mode():
            logits = sliding_window_inference(
                torch.from_numpy(image)[None], (args.patch,) * 3, args.batch, model,
                overlap=args.overlap, mode="gaussian",
            )
            return torch.sigmoid(logits)[0, 0].numpy()

    def level64() -> np.ndarray:
        return predict_case(model, case, "64", args.patch, overlap=args.overlap,
                            batch_size=args.batch, multiple=multiple).probability

    best = {"stroke-ray sliding_window_predict": np.inf, "MONAI sliding_window_inference": np.inf,
            "stroke-ray predict_case level 64": np.inf}
    runs = dict(zip(best, (ours, monai_direct, level64)))
    outputs = {}
    for round_ in range(args.rounds):
        order = list(runs.items())
        for name, run in order if round_ % 2 == 0 else order[::-1]:  # alternate who goes first
            start = time.perf_counter()
            outputs[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    a, b = outputs["stroke-ray sliding_window_predict"], outputs["MONAI sliding_window_inference"]
    print(f"case {case.subject} {tuple(image.shape)}, unet3d widths {args.widths}, window "
          f"{args.patch}^3, overlap {args.overlap}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    base = best["MONAI sliding_window_inference"]
    for name, seconds in best.items():
        print(f"{name:36s} {seconds:8.2f} s   x MONAI time {seconds / base:5.2f}")
    print(f"max |ours - MONAI+sigmoid| = {np.abs(a - b).max():.2e} "
          "(ours blends probabilities, MONAI logits)")


if __name__ == "__main__":
    main()
