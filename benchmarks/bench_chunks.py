"""Chunk shape and compressor of the store: random patch reads from a realistic cubic level.

The volume is the real ISLES'22 case (DWI, ADC, FLAIR) brought onto a cubic training grid (128^3 by default)
exactly as `convert` does, so the texture, background fraction and dynamic range are those
the store really holds. Every layout is written to its own local Zarr array; then the same
random 64^3 patches (random, unaligned corners) and whole volumes are read from each,
all in one run, and reported as ms per patch, size on disk and ratios to the best layout.

    .venv/bin/python benchmarks/bench_chunks.py [--patches 40] [--repeats 5] [--level 128]
        [--compressors "none,blosc lz4,blosc zstd-3"]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from stroke_ray.datasets import discover
from stroke_ray.ingest import load_case, make_levels

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isles22-sample"

def chunk_layouts(level: int) -> dict[str, tuple[int, int, int, int]]:
    edges = sorted({e for e in (32, 64, 128, level) if e <= level})
    layouts = {f"{e}^3 per channel": (1, e, e, e) for e in edges}
    layouts["3x64^3 all channels"] = (3, 64, 64, 64)
    return layouts


COMPRESSORS = {
    "none": None,
    "blosc lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc zstd-1": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
    "blosc zstd-3": BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    "blosc zstd-5": BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
}


def volume(level: int) -> np.ndarray:
    cases, _ = discover(SAMPLE)
    case = cases[0]
    prepared = load_case(case.images, case.mask, subject=case.subject)
    return make_levels(prepared, [level])[str(level)].image  # (3, L, L, L) float32


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=40, help="random 64^3 patches per layout")
    parser.add_argument("--repeats", type=int, default=5, help="whole-volume reads per layout")
    parser.add_argument("--level", type=int, default=128, help="edge of the cubic level to store")
    parser.add_argument("--compressors", default=",".join(COMPRESSORS), help="comma-separated subset")
    args = parser.parse_args()

    image = volume(args.level)
    CHUNKS = chunk_layouts(args.level)
    codecs = {name: COMPRESSORS[name] for name in args.compressors.split(",")}
    rng = np.random.default_rng(0)
    corners = rng.integers(0, args.level - 64 + 1, size=(args.patches, 3))
    work = Path(tempfile.mkdtemp(prefix="bench_chunks_"))
    layouts = [(c, z) for c in CHUNKS for z in codecs]
    arrays, sizes, writes = {}, {}, {}
    t64 = {k: [] for k in layouts}
    t128 = {k: [] for k in layouts}
    try:
        for i, (cname, zname) in enumerate(layouts):
            path = work / f"{i}.zarr"
            t0 = time.perf_counter()
            arr = zarr.create_array(
                str(path), shape=image.shape, dtype="float32", chunks=CHUNKS[cname],
                compressors=codecs[zname], fill_value=0,
            )
            arr[...] = image
            writes[cname, zname] = (time.perf_counter() - t0) * 1e3
            sizes[cname, zname] = du(path)
            arrays[cname, zname] = zarr.open_array(str(path), mode="r")
            arrays[cname, zname][:, :8, :8, :8]  # warm metadata and codec set-up
        # Interleaved: each patch is read from every layout in turn (shuffled order), so load
        # from other work on the machine hits all layouts alike and the ratios stay fair.
        for step, (x, y, z) in enumerate(corners):
            for k in rng.permutation(len(layouts)):
                key = layouts[k]
                t0 = time.perf_counter()
                patch = arrays[key][:, x:x + 64, y:y + 64, z:z + 64]
                t64[key].append((time.perf_counter() - t0) * 1e3)
                assert patch.shape == (3, 64, 64, 64)
                if step < args.repeats:
                    t0 = time.perf_counter()
                    whole = arrays[key][...]
                    t128[key].append((time.perf_counter() - t0) * 1e3)
                    np.testing.assert_array_equal(whole, image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        (c, z, statistics.median(t64[c, z]), statistics.median(t128[c, z]), sizes[c, z], writes[c, z])
        for c, z in layouts
    ]

    best64 = min(r[2] for r in rows)
    best128 = min(r[3] for r in rows)
    smallest = min(r[4] for r in rows)
    print(f"{args.level}^3 level of the ISLES'22 case, 3 channels float32 ({image.nbytes / 2**20:.1f} MiB raw); "
          f"{args.patches} random 64^3 patches, {args.repeats} whole-volume reads; medians")
    print("| chunks | compressor | 64^3 ms/patch | x best | whole-volume ms | x best | MiB | x smallest | write ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cname, zname, m64, m128, size, wms in rows:
        print(f"| {cname} | {zname} | {m64:.1f} | {m64 / best64:.2f} | {m128:.1f} | {m128 / best128:.2f} | "
              f"{size / 2**20:.2f} | {size / smallest:.2f} | {wms:.0f} |")


if __name__ == "__main__":
    main()
