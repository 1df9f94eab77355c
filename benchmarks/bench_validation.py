"""What scoring in the case's own space, mirroring TTA and fold ensembles cost, on the real case.

On the real ISLES'22 sample case (3 x 112 x 112 x 73) written to a store with a 64^3 level,
with one randomly initialised unet3d, times per call (best of --rounds, interleaved):

* level validation: the level image read from the store, sliding windows, metrics on the
  64^3 grid (what training validated before scoring moved to the native grid);
* native validation: `validation.predict_subject` + `score_subject` (resampling onto the
  level and back, native and level metrics, the postprocessing criterion);
* the same with 8 mirrorings (`val_tta_axes: [0, 1, 2]`) and with a 5-model ensemble.

    .venv/bin/python benchmarks/bench_validation.py [--widths 8 16 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stroke_ray.config import TrainConfig
from stroke_ray.ensemble import Ensemble
from stroke_ray.grid import spacing_of
from stroke_ray.inference import sliding_window_predict
from stroke_ray.ingest import load_case, make_levels
from stroke_ray.metrics import isles_metrics
from stroke_ray.models import build_model, size_multiple
from stroke_ray.store import StrokeStore
from stroke_ray.validation import predict_subject, score_subject

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isles22-sample"
SUBJECT = "sub-strokecase0009"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    raw = args.sample / "rawdata" / SUBJECT / "ses-0001"
    derivatives = args.sample / "derivatives" / SUBJECT / "ses-0001"
    images = {m: raw / f"{SUBJECT}_ses-0001_{m}.nii.gz" for m in ("dwi", "adc", "flair")}
    case = load_case(images, mask=derivatives / f"{SUBJECT}_ses-0001_msk.nii.gz", subject=SUBJECT)
    tmp = tempfile.mkdtemp(prefix="bench-validation-")
    store = StrokeStore.create(f"{tmp}/s.zarr", case.modalities, ["native", "64"])
    store.write_subject(SUBJECT, make_levels(case, [64]), case.attrs)
    store = StrokeStore.open(f"{tmp}/s.zarr")
    cfg = TrainConfig.from_dict({"model": {"widths": args.widths}, "data": {"store": store.url, "level": "64",
                                 "patch_size": 64}, "val_overlap": 0.5, "batch_size": 2})
    multiple = size_multiple(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=3).eval()
    ensemble = Ensemble([build_model(cfg.model, in_channels=3) for _ in range(5)]).eval()

    def level() -> None:
        image = store.normalise(SUBJECT, np.asarray(store.image(SUBJECT, "64")[...]))
        prob = sliding_window_predict(model, image, 64, overlap=0.5, batch_size=2, multiple=multiple)
        isles_metrics(prob >= 0.5, np.asarray(store.mask(SUBJECT, "64")[...]), spacing_of(store.affine(SUBJECT, "64")))

    def native(net=model, axes=()) -> None:
        c, p = predict_subject(net, store, SUBJECT, cfg, multiple=multiple, tta_axes=axes)
        score_subject(store, SUBJECT, c, p, "64")

    runs = {
        "level validation (before)": level,
        "native validation": native,
        "native validation, TTA 8 flips": lambda: native(axes=(0, 1, 2)),
        "native validation, 5-model ensemble": lambda: native(net=ensemble),
    }
    best = dict.fromkeys(runs, np.inf)
    for round_ in range(args.rounds):
        order = list(runs.items())
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{SUBJECT} {tuple(case.image.shape)} -> level 64, unet3d widths {args.widths}, overlap 0.5, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    base = best["level validation (before)"]
    for name, seconds in best.items():
        print(f"{name:40s} {seconds:7.2f} s   x level validation {seconds / base:5.2f}")


if __name__ == "__main__":
    main()
