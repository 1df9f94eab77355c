"""Benchmark 1: training-patch throughput, stroke-ray store vs TorchIO vs MONAI vs in-RAM.

Every loader delivers z-scored 3-channel 64^3 patches plus their mask, from the same
128^3 cases, `samples_per_volume` patches per loaded volume, in one process (num_workers=0,
so the figures compare the per-core cost of each pipeline):

- stroke-ray: PatchDataset on the Zarr store, threshold sampler (the seed's rejection
  criterion, lesion fraction > --threshold), three read modes:
    warm   steady state once the per-worker cache holds the cases (default settings; one
           untimed pass first)
    half   a cache budget of half the cases (`SubjectCache` keeps the same half; the others
           are read directly), after one untimed pass
    direct no cache (cache_bytes=0): each visit's patches straight from the chunks they
           touch (`chunk_reader`), the read path of a dataset bigger than RAM
- TorchIO: tio.Queue + tio.LabelSampler over tio.SubjectsDataset of the NIfTI files,
  ZNormalization.
- MONAI: LoadImaged + NormalizeIntensityd + RandCropByPosNegLabeld on the NIfTI files.
- in-RAM: the same z-scored volumes and masks preloaded as numpy arrays, the same
  threshold corners, slicing (the physical limit of any loader).

The machine may be shared, so the loaders run in --rounds interleaved rounds and each keeps
its best rate, on two clocks: wall time, and CPU time of this process (`process_time`, all
its threads), which other work on a loaded machine does not inflate. With --s3 the same
cases are also written to a store on a local S3-compatible server (moto on 127.0.0.1,
started here) and read by the direct and warm-cache modes; the server's own CPU is not in
this process, so for S3 read the wall-clock column.

    .venv/bin/python benchmarks/bench_sampling.py [--cases 4] [--passes 2] [--rounds 2] [--s3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from stroke_ray.integral import integral_volume
from stroke_ray.samplers import ThresholdSampler
from stroke_ray.sampling import PatchDataset, cut_patch
from stroke_ray.store import LevelArrays, StrokeStore

MODALITIES = ["dwi", "adc", "flair"]


def make_case(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 3-channel head-like volume and a ~20 mm lesion (realistic compressibility)."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n),) * 3, indexing="ij"))
    head = ((grid**2).sum(0) < 0.8).astype(np.float32)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (n, n, n)).astype(np.float32), 2)
    centre = rng.uniform(-0.4, 0.4, 3).reshape(3, 1, 1, 1)
    lesion = ((grid - centre) ** 2).sum(0) < rng.uniform(0.08, 0.14) ** 2
    image = np.stack([
        head * (800 + 200 * texture) + 600 * lesion,
        head * (900 + 150 * texture) - 400 * lesion,
        head * (300 + 80 * texture) + 100 * lesion,
    ]).astype(np.float32)
    image += rng.normal(0, 5, image.shape).astype(np.float32) * head
    return image, lesion.astype(np.uint8)


def build_inputs(root: Path, cases: int, n: int, s3_url: str | None = None) -> tuple[str, list[dict], list[str]]:
    rng = np.random.default_rng(0)
    store = StrokeStore.create(str(root / "bench.zarr"), MODALITIES, levels=[str(n)])
    remote = StrokeStore.create(s3_url, MODALITIES, levels=[str(n)]) if s3_url else None
    files, subjects = [], []
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    for i in range(cases):
        sid = f"sub-{i:03d}"
        image, mask = make_case(rng, n)
        head = image[0] > 0
        mean = [float(c[head].mean()) for c in image]
        std = [float(c[head].std()) for c in image]
        for target in (store, remote) if remote else (store,):
            target.write_subject(sid, {str(n): LevelArrays(image, mask, affine)},
                                 {"norm": {"mean": mean, "std": std, "region": "brain"}})
        entry = {"subject": sid, "label": str(root / f"{sid}_msk.nii.gz")}
        for m, channel in zip(MODALITIES, image):
            entry[m] = str(root / f"{sid}_{m}.nii.gz")
            nib.save(nib.Nifti1Image(channel, affine), entry[m])
        nib.save(nib.Nifti1Image(mask, affine), entry["label"])
        files.append(entry)
        subjects.append(sid)
    return str(root / "bench.zarr"), files, subjects


@contextmanager
def s3_server():
    """moto's S3 server on a free 127.0.0.1 port, with a bucket; this process pointed at it."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        yield "s3://bench/bench.zarr"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def timed(stream, count: int) -> tuple[float, float]:
    """Patches per second over `count` patches (each touched so lazy work is counted): by the
    wall clock and by this process's CPU time."""
    start, cpu = time.perf_counter(), time.process_time()
    checksum = 0.0
    for patch in itertools.islice(stream, count):
        checksum += float(patch[0, 0, 0, 0])
    return count / (time.perf_counter() - start), count / max(time.process_time() - cpu, 1e-9)


def ours(store: str, subjects: list[str], args, cache_bytes: int, warm: bool = False):
    ds = PatchDataset(store, subjects, str(args.size), args.patch, sampler="threshold",
                      threshold=args.threshold, samples_per_volume=args.spv, seed=0,
                      cache_bytes=cache_bytes)
    stream = (item["image"] for item in ds)
    if warm:  # one untimed pass fills the cache
        for _ in itertools.islice(stream, len(subjects) * args.spv):
            pass
    return stream


def in_ram(store_url: str, subjects: list[str], args):
    store = StrokeStore.open(store_url)
    volumes, masks, positions = [], [], []
    for s in subjects:
        volumes.append(store.normalise(s, store.image(s, str(args.size))[...]))
        mask = store.mask(s, str(args.size))[...]
        masks.append(mask)
        positions.append(ThresholdSampler(args.threshold).positions(integral_volume(mask), args.patch))
    rng = np.random.default_rng(0)
    patch = (args.patch,) * 3

    def stream():  # loading above is not timed; same visiting pattern as the loaders
        while True:
            for i in rng.permutation(len(volumes)):
                for _ in range(args.spv):
                    corner = positions[i].sample(rng)
                    torch.from_numpy(cut_patch(masks[i], corner, patch)[None].astype(np.float32))
                    yield torch.from_numpy(cut_patch(volumes[i], corner, patch))

    patches = stream()
    for _ in itertools.islice(patches, len(subjects) * args.spv):  # untimed, as ours warm
        pass
    return patches


def torchio_stream(files: list[dict], args):
    import torchio as tio

    subjects = [
        tio.Subject(
            image=tio.ScalarImage([f[m] for m in MODALITIES]),
            label=tio.LabelMap(f["label"]),
        )
        for f in files
    ]
    dataset = tio.SubjectsDataset(subjects, transform=tio.ZNormalization())
    sampler = tio.LabelSampler(args.patch, label_name="label", label_probabilities={0: 0, 1: 1})
    queue = tio.Queue(dataset, max_length=4 * args.spv, samples_per_volume=args.spv,
                      sampler=sampler, num_workers=0, shuffle_subjects=True, shuffle_patches=True,
                      verbose=False)
    while True:
        for patch in queue:
            yield patch["image"][tio.DATA]


def monai_stream(files: list[dict], args):
    from monai import transforms as mt

    keys = ["image", "label"]
    transform = mt.Compose([
        mt.LoadImaged(keys=keys, image_only=True),
        mt.EnsureChannelFirstd(keys=keys),
        mt.NormalizeIntensityd(keys="image", channel_wise=True),
        mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=(args.patch,) * 3,
                                  pos=1, neg=0, num_samples=args.spv),
    ])
    transform.set_random_state(0)
    items = [{"image": [f[m] for m in MODALITIES], "label": f["label"]} for f in files]
    rng = np.random.default_rng(0)
    while True:
        for i in rng.permutation(len(items)):
            for patch in transform(items[int(i)]):
                yield patch["image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--spv", type=int, default=8, help="samples per volume")
    parser.add_argument("--passes", type=int, default=2, help="passes over the cases per loader")
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept")
    parser.add_argument("--s3", action="store_true", help="also read the store from a local S3 server")
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = args.cases * args.spv * args.passes
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp, (s3_server() if args.s3 else _none()) as s3_url:
        store, files, subjects = build_inputs(Path(tmp), args.cases, args.size, s3_url)
        volume_bytes = 3 * args.size**3 * 4 + args.size**3
        loaders = {
            "in-RAM slicing": lambda: timed(in_ram(store, subjects, args), count),
            "stroke-ray warm cache": lambda: timed(
                ours(store, subjects, args, 2**30, warm=True), count),
            "stroke-ray cache of half the cases": lambda: timed(
                ours(store, subjects, args, volume_bytes * (args.cases // 2), warm=True), count),
            "stroke-ray direct chunks": lambda: timed(ours(store, subjects, args, 0), count),
            "TorchIO Queue+LabelSampler": lambda: timed(torchio_stream(files, args), count),
            "MONAI RandCropByPosNegLabeld": lambda: timed(monai_stream(files, args), count),
        }
        if s3_url:
            loaders["stroke-ray direct chunks, S3"] = lambda: timed(ours(s3_url, subjects, args, 0), count)
            loaders["stroke-ray warm cache, S3"] = lambda: timed(
                ours(s3_url, subjects, args, 2**30, warm=True), count)
        wall = {name: 0.0 for name in loaders}
        cpu = {name: 0.0 for name in loaders}
        for _ in range(args.rounds):
            for name, run in loaders.items():
                w, c = run()
                wall[name], cpu[name] = max(wall[name], w), max(cpu[name], c)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{args.cases} cases of 3x{args.size}^3, {args.patch}^3 patches, "
          f"samples_per_volume={args.spv}, {count} patches per loader, threshold {args.threshold}; "
          f"load average {' '.join(load_before)} before, {' '.join(load_after)} after")
    print("| loader | patches/s (wall) | x TorchIO | / in-RAM | patches/s (CPU) | x TorchIO | / in-RAM |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in loaders:
        w, c = wall[name], cpu[name]
        print(f"| {name} | {w:.1f} | {w / wall['TorchIO Queue+LabelSampler']:.1f} | {w / wall['in-RAM slicing']:.2f} "
              f"| {c:.1f} | {c / cpu['TorchIO Queue+LabelSampler']:.1f} | {c / cpu['in-RAM slicing']:.2f} |")


@contextmanager
def _none():
    yield None


if __name__ == "__main__":
    main()
