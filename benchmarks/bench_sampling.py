"""Benchmark 1: training-patch throughput, stroke-ray store vs TorchIO vs MONAI vs in-RAM.

Every loader delivers z-scored 3-channel 64^3 patches plus their mask, from the same
128^3 cases, `samples_per_volume` patches per loaded volume, in one process (num_workers=0,
so the figures compare the per-core cost of each pipeline):

- stroke-ray: PatchDataset on the Zarr store, threshold sampler (the seed's rejection
  criterion, lesion fraction > --threshold), three read modes:
    warm   steady state once the per-worker LRU cache holds the cases (default settings;
           one untimed pass first)
    visit  whole level read once per visit, no reuse across visits (cache smaller than a
           case): what every visit costs when the dataset does not fit the cache
    direct every patch read straight from its Zarr chunks (cache_bytes=0)
- TorchIO: tio.Queue + tio.LabelSampler over tio.SubjectsDataset of the NIfTI files,
  ZNormalization.
- MONAI: LoadImaged + NormalizeIntensityd + RandCropByPosNegLabeld on the NIfTI files.
- in-RAM: the same z-scored volumes and masks preloaded as numpy arrays, the same
  threshold corners, slicing (the physical limit of any loader).

The machine may be shared, so the loaders run in --rounds interleaved rounds and each
keeps its best rate.

    .venv/bin/python benchmarks/bench_sampling.py [--cases 4] [--passes 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
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


def build_inputs(root: Path, cases: int, n: int) -> tuple[str, list[dict], list[str]]:
    rng = np.random.default_rng(0)
    store = StrokeStore.create(str(root / "bench.zarr"), MODALITIES, levels=[str(n)])
    files, subjects = [], []
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    for i in range(cases):
        sid = f"sub-{i:03d}"
        image, mask = make_case(rng, n)
        head = image[0] > 0
        mean = [float(c[head].mean()) for c in image]
        std = [float(c[head].std()) for c in image]
        store.write_subject(sid, {str(n): LevelArrays(image, mask, affine)},
                            {"norm": {"mean": mean, "std": std, "region": "brain"}})
        entry = {"subject": sid, "label": str(root / f"{sid}_msk.nii.gz")}
        for m, channel in zip(MODALITIES, image):
            entry[m] = str(root / f"{sid}_{m}.nii.gz")
            nib.save(nib.Nifti1Image(channel, affine), entry[m])
        nib.save(nib.Nifti1Image(mask, affine), entry["label"])
        files.append(entry)
        subjects.append(sid)
    return str(root / "bench.zarr"), files, subjects


def timed(stream, count: int) -> float:
    """Patches per second over `count` patches (each touched so lazy work is counted)."""
    start = time.perf_counter()
    checksum = 0.0
    for patch in itertools.islice(stream, count):
        checksum += float(patch[0, 0, 0, 0])
    return count / (time.perf_counter() - start)


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
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = args.cases * args.spv * args.passes
    with tempfile.TemporaryDirectory() as tmp:
        store, files, subjects = build_inputs(Path(tmp), args.cases, args.size)
        volume_bytes = 3 * args.size**3 * 4
        loaders = {
            "in-RAM slicing": lambda: timed(in_ram(store, subjects, args), count),
            "stroke-ray warm cache": lambda: timed(
                ours(store, subjects, args, 2**30, warm=True), count),
            "stroke-ray read per visit": lambda: timed(
                ours(store, subjects, args, volume_bytes // 2), count),
            "stroke-ray direct chunks": lambda: timed(ours(store, subjects, args, 0), count),
            "TorchIO Queue+LabelSampler": lambda: timed(torchio_stream(files, args), count),
            "MONAI RandCropByPosNegLabeld": lambda: timed(monai_stream(files, args), count),
        }
        rates = {name: 0.0 for name in loaders}
        for _ in range(args.rounds):
            for name, run in loaders.items():
                rates[name] = max(rates[name], run())
    print(f"{args.cases} cases of 3x{args.size}^3, {args.patch}^3 patches, "
          f"samples_per_volume={args.spv}, {count} patches per loader, threshold {args.threshold}")
    base_tio = rates["TorchIO Queue+LabelSampler"]
    base_monai = rates["MONAI RandCropByPosNegLabeld"]
    base_ram = rates["in-RAM slicing"]
    print(f"{'loader':32s} {'patches/s':>10s} {'x TorchIO':>10s} {'x MONAI':>9s} {'/ in-RAM':>9s}")
    for name, rate in rates.items():
        print(f"{name:32s} {rate:10.1f} {rate / base_tio:10.1f} {rate / base_monai:9.1f} "
              f"{rate / base_ram:9.2f}")


if __name__ == "__main__":
    main()
