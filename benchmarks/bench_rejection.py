"""Benchmark 2: naive rejection sampling vs the precomputed accepted-corner set.

Naive (the seed's loop): propose a uniform corner, sum the mask inside the cube, keep it
when the cube holds more than `threshold` of the subject's lesion volume, else try again.
Ours: ThresholdSampler.positions (every corner's count from the summed-volume table, once
per subject) then O(1) draws from the accepted set. Same distribution, no loop.

The mask is a 128^3 volume with two lesions far apart (60 % / 40 % of the lesion volume),
so thresholds above ~0.6 are infeasible for any 64^3 cube: the naive loop would never end
(reported as "> cap"); ours falls back to the best cubes and says so.

    .venv/bin/python benchmarks/bench_rejection.py [--cap 20000] [--patches 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stroke_ray.integral import integral_volume
from stroke_ray.samplers import ThresholdSampler


def two_lesions(n: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij")).astype(np.float32)
    a = ((grid - np.array([0.3, 0.3, 0.5]).reshape(3, 1, 1, 1) * n) ** 2).sum(0) < (0.09 * n) ** 2
    b = ((grid - np.array([0.75, 0.7, 0.5]).reshape(3, 1, 1, 1) * n) ** 2).sum(0) < (0.079 * n) ** 2
    return (a | b).astype(np.uint8)


def naive(mask: np.ndarray, patch: int, threshold: float, rng, cap: int) -> int | None:
    """Tries until a cube is accepted, or None after `cap` tries."""
    total = mask.sum()
    hi = np.asarray(mask.shape) - patch
    for tries in range(1, cap + 1):
        x, y, z = (int(rng.integers(0, h + 1)) for h in hi)
        if mask[x : x + patch, y : y + patch, z : z + patch].sum() / total > threshold:
            return tries
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=20, help="patches per threshold")
    parser.add_argument("--cap", type=int, default=20000, help="naive tries before giving up")
    args = parser.parse_args()
    mask = two_lesions(args.size)
    table = integral_volume(mask)  # written once by ingest, read from the store
    rng = np.random.default_rng(0)
    print(f"{args.size}^3 mask, {int(mask.sum())} lesion voxels in two lesions, "
          f"{args.patch}^3 patches, {args.patches} patches per threshold, cap {args.cap} tries")
    print(f"{'thr':>4s} {'naive tries/patch':>18s} {'naive ms/patch':>15s} "
          f"{'ours setup ms':>14s} {'ours us/patch':>14s} {'accepted':>9s} {'ours reason':>12s} "
          f"{'speed-up':>9s}")
    for threshold in np.round(np.arange(0.1, 1.0, 0.1), 1):
        start = time.perf_counter()
        tries, made = 0, 0
        for _ in range(args.patches):
            t = naive(mask, args.patch, threshold, rng, args.cap)
            if t is None:
                tries = None
                break
            tries += t
            made += 1
        naive_s = time.perf_counter() - start
        start = time.perf_counter()
        pos = ThresholdSampler(float(threshold)).positions(table, args.patch)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        draws = 10000
        for _ in range(draws):
            pos.sample(rng)
        per_draw = (time.perf_counter() - start) / draws
        if tries is None:
            naive_tries, naive_ms, speedup = f"> {args.cap}", "endless", "inf"
        else:
            per_patch = naive_s / made
            naive_tries, naive_ms = f"{tries / made:.1f}", f"{1e3 * per_patch:.2f}"
            speedup = f"{per_patch / per_draw:.0f}x"
        print(f"{threshold:4.1f} {naive_tries:>18s} {naive_ms:>15s} {1e3 * setup:14.1f} "
              f"{1e6 * per_draw:14.1f} {pos.size:9d} {pos.reason:>12s} {speedup:>9s}")
    print("speed-up = naive time per patch / ours per draw; ours' setup (the accepted set from "
          "the stored summed-volume table) is paid once per subject and worker, then cached")


if __name__ == "__main__":
    main()
