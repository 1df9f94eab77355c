"""Do the synthetic real-scan artefacts cut false lesions on the real ISLES'22 sample case?

    .venv/bin/python benchmarks/bench_artefacts.py [--cases 16] [--epochs 8] [--steps 30] [--work DIR]

Trains the same model twice on the same synthetic cases (`stroke-ray synth`, seed 0), once
with `--no-artefacts` and once with the default artefacts (the two datasets differ only by
the artefacts: they have their own random stream), for the same number of steps at the
64^3 level (a 16-32-64-128 3D U-Net, no augmentation), then predicts the real sample case (../shared/data/isles22-sample) with each
and prints Dice, lesion F1, true/false-positive components and the predicted volume, by
the same `stroke_ray.metrics` code. Everything goes through the `stroke-ray` CLI, so the
commands printed are the ones a user would type.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from stroke_ray.metrics import isles_metrics, lesion_counts

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "isles22-sample"
SUBJECT = "sub-strokecase0009"
CLI = [str(Path(sys.executable).with_name("stroke-ray"))]
VARIANTS = ("no-artefacts", "artefacts")
LOW_THRESHOLD = 0.2


def run(args: list[str], log: Path) -> str:
    print("$ stroke-ray " + " ".join(args), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(CLI + args, capture_output=True, text=True, cwd=log.parent)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}); see {log}")
    print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    return proc.stdout


def train(work: Path, name: str, artefacts: bool, args) -> Path:
    data, store = work / f"data-{name}", work / f"{name}.zarr"
    if not (data / "dataset_description.json").exists():
        run(["synth", "-o", str(data), "-n", str(args.cases), "--seed", "0",
             "--artefacts" if artefacts else "--no-artefacts"], work / f"synth-{name}.log")
    run(["convert", str(data), "-o", str(store), "-m", "dwi,adc,flair", "--levels", "64"],
        work / f"convert-{name}.log")
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "name": name, "experiment": "artefact-bench", "storage_path": str(work / "runs"),
        "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "model": {"widths": args.widths},
        "data": {"store": str(store), "level": "64", "patch_size": 64, "val_fraction": 0.125},
        "epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": 2, "seed": 0,
        "val_max_subjects": 1,
    }))
    out = run(["train", "-c", str(config)], work / f"train-{name}.log")
    line = next(x for x in out.splitlines() if x.startswith("checkpoint: "))
    return Path(line.split(": ", 1)[1].strip())


def score_real(work: Path, name: str, checkpoint: Path) -> dict:
    """Metrics of the model's mask on the real case, and where its probability goes: the
    true lesion, the bright non-lesion DWI (> 1.5 x the brain median: the rims), the rest
    of the brain. A short training may leave every voxel under 0.5; the probabilities
    still show whether the model ranks the rims with the lesion or below it."""
    out = work / f"pred-{name}"
    run(["predict", "-i", str(SAMPLE), "-o", str(out), "-m", str(checkpoint), "--device", "cpu",
         "--probability"], work / f"predict-{name}.log")
    pred_path = next(out.rglob(f"{SUBJECT}*_mask.nii.gz"))
    prob = nib.load(next(out.rglob(f"{SUBJECT}*_prob.nii.gz"))).get_fdata(dtype=np.float32)
    truth_img = nib.load(SAMPLE / "derivatives" / SUBJECT / "ses-0001" / f"{SUBJECT}_ses-0001_msk.nii.gz")
    truth = np.asarray(truth_img.dataobj) > 0
    pred = np.asarray(nib.load(pred_path).dataobj) > 0
    spacing = truth_img.header.get_zooms()[:3]
    metrics = isles_metrics(pred, truth, spacing)
    tp, fp, fn = lesion_counts(pred, truth)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    dwi = nib.load(SAMPLE / "rawdata" / SUBJECT / "ses-0001" / f"{SUBJECT}_ses-0001_dwi.nii.gz").get_fdata()
    brain = dwi > 0
    rims = brain & ~truth & (dwi > 1.5 * np.median(dwi[brain]))
    rest = brain & ~truth & ~rims
    low = prob >= LOW_THRESHOLD
    tp_low, fp_low, fn_low = lesion_counts(low, truth)
    return {**metrics, "tp": tp, "fp_components": fp, "fn": fn,
            "pred_ml": float(pred.sum()) * voxel_ml, "truth_ml": float(truth.sum()) * voxel_ml,
            "prob_lesion": float(prob[truth].mean()), "prob_rims": float(prob[rims].mean()),
            "prob_rest": float(prob[rest].mean()),
            "lesion_over_rims": float(prob[truth].mean() / max(prob[rims].mean(), 1e-6)),
            f"dice@{LOW_THRESHOLD}": isles_metrics(low, truth, spacing)["dice"],
            f"tp@{LOW_THRESHOLD}": tp_low, f"fp_components@{LOW_THRESHOLD}": fp_low,
            f"fp_ml_on_rims@{LOW_THRESHOLD}": float((low & rims).sum()) * voxel_ml}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128],
                    help="U-Net channels per level (comma-separated)")
    ap.add_argument("--work", type=Path, default=REPO / "bench-work" / "artefacts")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="score this checkpoint as the (single) variant instead of training it")
    ap.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                    help="which models to train here (comma-separated; default both, one after the other)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DISABLE_DASHBOARD", "1")
    for name in args.variants:
        t = time.perf_counter()
        checkpoint = args.checkpoint or train(work, name, name == "artefacts", args)
        row = score_real(work, name, checkpoint)
        row["seconds"] = time.perf_counter() - t
        (work / f"result-{name}.json").write_text(json.dumps(row, indent=2))
        print(name, json.dumps(row), flush=True)
    # Every variant measured so far in this work folder (variants may run as separate processes).
    rows = {name: json.loads((work / f"result-{name}.json").read_text())
            for name in VARIANTS if (work / f"result-{name}.json").is_file()}
    keys = ["dice", "lesion_f1", "tp", "fp_components", "fn", "pred_ml", "truth_ml", "abs_volume_diff_ml",
            "prob_lesion", "prob_rims", "prob_rest", "lesion_over_rims", f"dice@{LOW_THRESHOLD}",
            f"tp@{LOW_THRESHOLD}", f"fp_components@{LOW_THRESHOLD}", f"fp_ml_on_rims@{LOW_THRESHOLD}", "seconds"]
    print(f"\nreal sample {SUBJECT}, models trained {args.epochs} x {args.steps} steps on {args.cases} cases")
    print(f"{'':26s}" + "".join(f"{k:>16s}" for k in rows))
    for key in keys:
        print(f"{key:26s}" + "".join(f"{rows[r].get(key, float('nan')):16.3f}" for r in rows))
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
