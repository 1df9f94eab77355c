"""Synthetic-case generation speed, against baselines measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_synth.py [--cases 4]

Prints, per ISLES'22-like case (one core):
  * synth       stroke_ray.synth.generate_dataset (sample at brain voxels through the
                composed subject + grid transform, write three images + mask)
  * naive       the textbook route for the same case: warp the three 1 mm tissue maps
                into the subject (scipy affine_transform over the whole 1 mm head box),
                mix the contrasts at 1 mm, then grid.resample (antialiased) onto the
                DWI and FLAIR grids; no lesion, noise or file writing, so it is a
                lower bound of that route
  * read-real   nibabel reading the real ISLES'22 sample case (4 files) into float arrays
and the ratios synth/naive and synth/read-real, plus the target: 4 cases (with the
template load) well under 15 s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from stroke_ray import synth  # noqa: E402
from stroke_ray.grid import resample  # noqa: E402
from stroke_ray.synth.cases import isles_grids  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isles22-sample"


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def naive_case(index: int, seed: int = 0) -> None:
    """Render case `index` the straightforward way (1 mm in subject space, then resample)."""
    anatomy = synth.mni_anatomy()
    rng = np.random.default_rng([seed, index, 0])
    transform = synth.SubjectTransform.random(rng, 4.0, 0.08, 4.0, 2.0, anatomy.centre,
                                              mean_scale=synth.BRAIN_SCALE)
    grids = isles_grids(rng, transform.matrix[:3, :3] @ anatomy.centre + transform.matrix[:3, 3])
    # 1 mm subject-space box: the template box moved by the subject transform.
    box_affine = transform.matrix @ anatomy.affine
    to_template = np.linalg.inv(anatomy.affine) @ np.linalg.inv(transform.matrix) @ box_affine
    tissues = [ndimage.affine_transform(t, to_template[:3, :3], offset=to_template[:3, 3], order=1)
               for t in anatomy.tissues]
    for modality in ("dwi", "adc", "flair"):
        c = synth.CONTRASTS[modality]
        image = c.gm * tissues[0] + c.wm * tissues[1] + c.csf * tissues[2]
        grid = grids[modality]
        resample(image, box_affine, grid.shape, grid.affine, order=1, antialias=True)


def read_real() -> None:
    for path in sorted(SAMPLE.rglob("*.nii.gz")):
        nib.load(path).get_fdata(dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()

    start = _clock()
    synth.mni_anatomy()
    load_wall, load_cpu = _since(start)

    with tempfile.TemporaryDirectory() as tmp:
        start = _clock()
        synth.generate_dataset(Path(tmp) / "ds", num_cases=args.cases, seed=0, progress=False)
        gen_wall, gen_cpu = _since(start)
    synth_wall, synth_cpu = gen_wall / args.cases, gen_cpu / args.cases

    naive_case(0)  # filtered maps and caches warm, as for synth
    start = _clock()
    for k in range(args.cases):
        naive_case(k)
    naive_wall, naive_cpu = (x / args.cases for x in _since(start))

    read_real()
    start = _clock()
    for _ in range(3):
        read_real()
    real_wall, real_cpu = (x / 3 for x in _since(start))

    print(f"template load (once)      wall {load_wall:6.2f} s  cpu {load_cpu:6.2f} s")
    print(f"synth      per case       wall {synth_wall:6.2f} s  cpu {synth_cpu:6.2f} s")
    print(f"naive      per case       wall {naive_wall:6.2f} s  cpu {naive_cpu:6.2f} s")
    print(f"read-real  per case       wall {real_wall:6.2f} s  cpu {real_cpu:6.2f} s")
    print(f"ratio synth/naive         wall {synth_wall / naive_wall:6.2f}    cpu {synth_cpu / naive_cpu:6.2f}")
    print(f"ratio synth/read-real     wall {synth_wall / real_wall:6.2f}    cpu {synth_cpu / real_cpu:6.2f}")
    total_wall, total_cpu = load_wall + gen_wall, load_cpu + gen_cpu
    print(f"{args.cases} cases incl. template load: wall {total_wall:.2f} s  cpu {total_cpu:.2f} s (target < 15 s)")
    print(f"load average (1 min) during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
