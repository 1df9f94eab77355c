"""Direct patch reads from a Zarr level: which read path, chunk layout, codec and threads.

One visit of the training stream cuts `--spv` random 64^3 patches (threshold sampler,
corners around the lesion) from one 3x128^3 case. Per layout and read path, the same
visits are timed in one run, interleaved, and reported as CPU milliseconds per patch
(`time.process_time`, all threads of this process: the machine is shared, so wall time
would measure the other work on it) and as wall milliseconds, with the share of the level's
chunks a visit touches.

Read paths:
  zarr per patch   arr[:, x:x+64, ...] for each patch (stroke-ray's direct path until now)
  zarr visit box   one zarr read of the box around all of a visit's patches, then slicing
  chunk reader     `stroke_ray.chunk_reader`: the chunks the visit's patches touch, fetched
                   concurrently and decoded once each, patches cut from them

    .venv/bin/python benchmarks/bench_read_path.py [--visits 12] [--spv 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import make_case  # noqa: E402 - the benchmarks folder is on the path only now

from stroke_ray.chunk_reader import ChunkReader  # noqa: E402
from stroke_ray.integral import integral_volume  # noqa: E402
from stroke_ray.samplers import ThresholdSampler  # noqa: E402

LZ4 = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
ZSTD = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
LAYOUTS = {  # name: (chunks, shards, compressor)
    "3x64^3 lz4 (store default)": ((3, 64, 64, 64), None, LZ4),
    "3x32^3 lz4": ((3, 32, 32, 32), None, LZ4),
    "3x64^3 zstd-3": ((3, 64, 64, 64), None, ZSTD),
    "3x64^3 uncompressed": ((3, 64, 64, 64), None, None),
    "sharded 3x16^3 in 3x64^3 lz4": ((3, 16, 16, 16), (3, 64, 64, 64), LZ4),
    "sharded 3x32^3 in 3x128^3 lz4": ((3, 32, 32, 32), (3, 128, 128, 128), LZ4),
}


def zarr_per_patch(arr, corners, patch):
    return [arr[:, x:x + patch, y:y + patch, z:z + patch] for x, y, z in corners]


def zarr_visit_box(arr, corners, patch):
    lo = corners.min(0)
    hi = corners.max(0) + patch
    box = arr[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return [box[:, x - lo[0]:x - lo[0] + patch, y - lo[1]:y - lo[1] + patch, z - lo[2]:z - lo[2] + patch].copy()
            for x, y, z in corners]


def chunk_reader(reader, corners, patch):
    boxes = [(tuple(int(v) for v in c), (patch,) * 3) for c in corners]
    chunks = reader.fetch(reader.chunk_ids(boxes))
    return [reader.read(b[0], b[1], chunks) for b in boxes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=12)
    parser.add_argument("--spv", type=int, default=8, help="patches per visit")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--blosc-threads", default="1,2", help="Blosc thread counts to compare")
    args = parser.parse_args()
    image, mask = make_case(np.random.default_rng(0), 128)
    positions = ThresholdSampler(args.threshold).positions(integral_volume(mask), args.patch)
    rng = np.random.default_rng(1)
    visits = [np.array([positions.sample(rng) for _ in range(args.spv)]) for _ in range(args.visits)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_read_path_"))
    arrays = {}
    for i, (name, (chunks, shards, codec)) in enumerate(LAYOUTS.items()):
        arr = zarr.create_array(str(tmp / f"{i}.zarr"), shape=image.shape, dtype="float32", chunks=chunks,
                                shards=shards, compressors=codec, fill_value=0)
        arr[...] = image
        arrays[name] = zarr.open_array(str(tmp / f"{i}.zarr"), mode="r")
    paths = {"zarr per patch": zarr_per_patch, "zarr visit box": zarr_visit_box, "chunk reader": chunk_reader}
    threads = [int(t) for t in args.blosc_threads.split(",")]
    cases = [(layout, path, t) for layout in arrays for path in paths for t in threads
             if not (path == "chunk reader" and LAYOUTS[layout][1] is not None)]  # sharded: zarr only
    readers = {layout: ChunkReader(arr) for layout, arr in arrays.items()}
    cpu = {c: 0.0 for c in cases}
    wall = {c: 0.0 for c in cases}
    touched = []
    for corners in visits:
        reader = readers["3x64^3 lz4 (store default)"]
        touched.append(len(reader.chunk_ids([(tuple(c), (args.patch,) * 3) for c in corners])) / 8)
        for k in rng.permutation(len(cases)):  # interleaved: the load hits every case alike
            layout, path, t = cases[k]
            numcodecs.blosc.set_nthreads(t)
            target = readers[layout] if path == "chunk reader" else arrays[layout]
            c0, w0 = time.process_time(), time.perf_counter()
            patches = paths[path](target, corners, args.patch)
            cpu[cases[k]] += time.process_time() - c0
            wall[cases[k]] += time.perf_counter() - w0
            assert len(patches) == args.spv
            np.testing.assert_array_equal(patches[0], image[:, corners[0][0]:corners[0][0] + args.patch,
                                                            corners[0][1]:corners[0][1] + args.patch,
                                                            corners[0][2]:corners[0][2] + args.patch])
    n = args.visits * args.spv
    print(f"3x128^3 case, {args.patch}^3 patches, {args.spv} per visit, {args.visits} visits, threshold "
          f"{args.threshold}; a visit touches {np.mean(touched):.0%} of the level's 3x64^3 chunks (mean)")
    best = min(cpu.values())
    print("| layout | read path | blosc threads | CPU ms/patch | x best | wall ms/patch |")
    print("|---|---|---:|---:|---:|---:|")
    for c in sorted(cases, key=lambda c: cpu[c]):
        print(f"| {c[0]} | {c[1]} | {c[2]} | {cpu[c] / n * 1e3:.2f} | {cpu[c] / best:.1f} | {wall[c] / n * 1e3:.1f} |")


if __name__ == "__main__":
    main()
