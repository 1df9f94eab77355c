"""Synthetic DWI/ADC/FLAIR intensity statistics next to the real ISLES'22 sample case.

    .venv/bin/python benchmarks/synth_realism.py [--cases 8] [--figure docs/img/synth_vs_real.png]

For the real case and for synthetic cases of the `train` profile without and with the
real-scan artefacts and of the `shifted` profile, prints (relative to each case's own
brain median): the brain medians, the DWI of the lesion, DWI percentiles by depth below
the brain surface (the rims), the share of non-lesion brain brighter than 1.5 x the DWI
median, and how much of that bright non-lesion brain also has a low ADC (< 0.7 x, the
infarct's signature). Optionally draws axial slices of the real case and a synthetic one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from stroke_ray.synth import PROFILES, synth_case, without_artefacts

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isles22-sample"
SUBJECT = "sub-strokecase0009"
BANDS_MM = ((0.0, 3.0), (3.0, 6.0), (6.0, 10.0), (10.0, np.inf))


def real_case() -> dict[str, np.ndarray]:
    raw = SAMPLE / "rawdata" / SUBJECT / "ses-0001"
    out = {m: nib.load(raw / f"{SUBJECT}_ses-0001_{m}.nii.gz") for m in ("dwi", "adc", "flair")}
    msk = nib.load(SAMPLE / "derivatives" / SUBJECT / "ses-0001" / f"{SUBJECT}_ses-0001_msk.nii.gz")
    arrays = {m: img.get_fdata(dtype=np.float32) for m, img in out.items()}
    arrays["mask"] = np.asarray(msk.dataobj) > 0
    arrays["spacing"] = np.asarray(out["dwi"].header.get_zooms()[:3], float)
    return arrays


def synthetic(index: int, profile: str, artefacts: bool = True) -> dict[str, np.ndarray]:
    settings = PROFILES[profile]
    if not artefacts:
        settings = without_artefacts(settings)
    case = synth_case(index, seed=0, settings=settings)
    arrays = {m: image for m, (image, _) in case.images.items()}
    arrays["mask"] = case.mask > 0
    arrays["spacing"] = np.sqrt((case.mask_affine[:3, :3] ** 2).sum(axis=0))
    return arrays


def statistics(case: dict[str, np.ndarray]) -> dict[str, float]:
    dwi, adc, lesion = case["dwi"], case["adc"], case["mask"]
    brain = dwi > 0
    dwi_med, adc_med = float(np.median(dwi[brain])), float(np.median(adc[adc > 0]))
    depth = ndimage.distance_transform_edt(brain, sampling=case["spacing"])
    stats = {"dwi_median": dwi_med, "adc_median": adc_med,
             "flair_median": float(np.median(case["flair"][case["flair"] > 0])),
             "lesion_dwi": float(np.median(dwi[lesion])) / dwi_med,
             "lesion_adc": float(np.median(adc[lesion])) / adc_med}
    for lo, hi in BANDS_MM:
        band = brain & ~lesion & (depth > lo) & (depth <= hi)
        name = f"dwi_p99_{lo:g}-{hi:g}mm" if np.isfinite(hi) else f"dwi_p99_>{lo:g}mm"
        stats[name] = float(np.percentile(dwi[band], 99)) / dwi_med if band.any() else float("nan")
    outside = dwi[brain & ~lesion] / dwi_med
    stats["dwi_p99.9_outside"] = float(np.percentile(outside, 99.9))
    stats["dwi_max_outside"] = float(outside.max())
    stats["above_2.5x_per_100k"] = 1e5 * float((outside > 2.5).sum()) / outside.size  # the hot tail
    bright = brain & ~lesion & (dwi > 1.5 * dwi_med)
    stats["bright_pct"] = 100.0 * bright.sum() / (brain & ~lesion).sum()
    stats["bright_lowadc_pct"] = 100.0 * (bright & (adc < 0.7 * adc_med)).sum() / max(bright.sum(), 1)
    stats["bright_adc"] = float(np.median(adc[bright])) / adc_med if bright.any() else float("nan")
    return stats


def figure(real: dict, synth: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def slices(case):
        brain = case["dwi"] > 0
        zs = np.flatnonzero(brain.any(axis=(0, 1)))
        return [int(zs[0] + f * (zs[-1] - zs[0])) for f in (0.12, 0.22, 0.32, 0.45, 0.6)]

    fig, axes = plt.subplots(4, 5, figsize=(11, 9.2))
    for row, (case, name) in enumerate(((real, "real"), (synth, "synthetic"))):
        med = np.median(case["dwi"][case["dwi"] > 0])
        for col, z in enumerate(slices(case)):
            dwi, adc, lesion = case["dwi"][:, :, z], case["adc"][:, :, z], case["mask"][:, :, z]
            bright = (dwi > 1.5 * med) & ~lesion
            ax = axes[2 * row, col]
            ax.imshow(np.rot90(dwi), cmap="gray", vmin=0, vmax=2.2 * med)
            overlay = np.zeros((*dwi.shape, 4))
            overlay[bright] = (1, 0.1, 0.1, 0.55)
            overlay[lesion] = (0.1, 1, 0.1, 0.8)
            ax.imshow(np.rot90(overlay))
            ax.set_title(f"{name} DWI z={z}", fontsize=8)
            axes[2 * row + 1, col].imshow(np.rot90(adc), cmap="gray", vmin=0, vmax=2.0)
            axes[2 * row + 1, col].set_title(f"{name} ADC", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("DWI (red: non-lesion > 1.5 x brain median; green: lesion mask) and ADC", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"figure: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--figure-case", type=int, default=0, help="train case drawn next to the real one")
    args = ap.parse_args()
    real = real_case()
    rows = {"real sample": statistics(real)}
    for label, profile, artefacts in (("train, no artefacts", "train", False), ("train", "train", True),
                                      ("shifted", "shifted", True)):
        per_case = [statistics(synthetic(i, profile, artefacts)) for i in range(args.cases)]
        rows[label] = {k: float(np.nanmedian([s[k] for s in per_case])) for k in per_case[0]}
    keys = list(rows["real sample"])
    print(f"{'':24s}" + "".join(f"{k:>21s}" for k in rows))
    for key in keys:
        print(f"{key:24s}" + "".join(f"{rows[r][key]:21.3f}" for r in rows))
    print(f"(synthetic: median over {args.cases} cases, seed 0; DWI figures relative to the brain median)")
    if args.figure:
        figure(real, synthetic(args.figure_case, "train", True), args.figure)


if __name__ == "__main__":
    main()
