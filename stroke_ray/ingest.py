"""From NIfTI files to the Zarr store: read, validate, co-register by affine, write levels.

`load_case` reads one subject's images and mask, refuses bad files with one clear
`InputFileError` (the file and the problem), resamples every modality onto the first
modality's grid through the two affines, and computes per-channel normalisation
statistics. `make_levels` adds the cubic training grids. `convert_dataset` runs one Ray
task per subject, each writing its subject straight into the store, and is idempotent:
a subject whose group is complete and whose recorded source checksums still match the
files is skipped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stroke_ray.checks import check_image_values, check_mask_values, mask_on_grid, same_grid
from stroke_ray.datasets import CaseFiles, Problem, open_dataset
from stroke_ray.errors import ConfigError, InputFileError, StrokeRayError
from stroke_ray.grid import (
    level_grid,
    orientation_code,
    parse_level,
    resample,
    resample_mask,
    spacing_of,
)
from stroke_ray.intensity import NORMALIZATIONS
from stroke_ray.locations import absolute
from stroke_ray.lookalikes import find_lookalikes
from stroke_ray.nifti import ImageLimits, NiftiRead, read_nifti_file
from stroke_ray.raycluster import connect
from stroke_ray.store import NATIVE, LevelArrays, StoreError, StrokeStore, check_output
from stroke_ray.store_lock import writer_lock

__all__ = [
    "BRAIN_FRACTION",
    "ROBUST_PERCENTILE",
    "brain_stats",
    "convert_dataset",
    "convert_subject",
    "load_case",
    "make_levels",
    "sha256_of",
    "ConvertReport",
    "PreparedCase",
]

# A voxel is "brain" for the statistics when it exceeds this fraction of the channel's
# robust maximum (99.5th percentile): it drops air/background and keeps tissue on DWI,
# ADC, FLAIR and T1w alike without needing a skull-stripping model.
BRAIN_FRACTION = 0.05
ROBUST_PERCENTILE = 99.5


@dataclass
class PreparedCase:
    """One subject on its reference grid, ready for the store or for prediction."""

    subject: str
    modalities: list[str]
    image: np.ndarray  # (C, X, Y, Z) float32
    mask: np.ndarray | None  # (X, Y, Z) uint8
    affine: np.ndarray  # 4x4 of the reference grid
    attrs: dict[str, Any] = field(default_factory=dict)


# --- reading and validating one file --------------------------------------------------------
def sha256_of(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(vol: NiftiRead) -> dict[str, Any]:
    """A source file as the store records it."""
    return {
        "path": vol.source,
        "sha256": vol.sha256,
        "shape": list(vol.data.shape),
        "affine": vol.affine.tolist(),
        "spacing": spacing_of(vol.affine).tolist() if vol.affine_problem is None else None,
        "orientation": orientation_code(vol.affine) if vol.affine_problem is None else None,
        "dtype": vol.on_disk_dtype,
    }


def _read_image(path: str | Path, limits: ImageLimits) -> NiftiRead:
    """Read an image channel header first (`nifti.read_nifti_file`), then check its values."""
    vol = read_nifti_file(path, limits)
    check_image_values(vol)
    return vol


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _grid_info(shape, affine) -> dict[str, Any]:
    return {
        "shape": list(shape),
        "affine": np.asarray(affine).tolist(),
        "spacing": spacing_of(affine).tolist(),
        "orientation": orientation_code(affine),
    }


def brain_stats(channel: np.ndarray) -> tuple[float, float]:
    """Mean and std of a channel within its brain region (see BRAIN_FRACTION)."""
    values = channel[np.isfinite(channel)]
    robust_max = float(np.percentile(values, ROBUST_PERCENTILE)) if values.size else 0.0
    region = values[values > BRAIN_FRACTION * robust_max] if robust_max > 0 else values[values != 0]
    if region.size < 16:  # nearly empty channel: fall back to every voxel
        region = values
    mean = float(region.mean()) if region.size else 0.0
    std = float(region.std()) if region.size else 1.0
    return mean, std if std > 1e-6 else 1.0


# --- one case -------------------------------------------------------------------------------
def load_case(
    images: dict[str, str | Path],
    mask: str | Path | None = None,
    subject: str = "case",
    limits: ImageLimits = ImageLimits(),
    resample_masks: bool = False,
) -> PreparedCase:
    """Read, validate and co-register one subject onto its first modality's grid.

    Every file is read header first (`nifti.read_nifti_file`) under `limits`, then its
    values are checked (`checks`). Other modalities are resampled onto the first one's
    grid; a mask on another grid is an error unless `resample_masks`.

    Raises:
        InputFileError: a file that fails a header or value check (one line: file, problem).
        ConfigError: no image given.
    """
    if not images:
        raise ConfigError(f"{subject}: no image given")
    modalities = list(images)
    reference = _read_image(images[modalities[0]], limits)
    ref_shape, ref_affine = reference.data.shape, reference.affine
    channels = [reference.data.astype(np.float32)]
    sources = {modalities[0]: _describe(reference)}
    for modality in modalities[1:]:
        vol = _read_image(images[modality], limits)
        sources[modality] = _describe(vol)
        if same_grid(vol.data.shape, vol.affine, ref_shape, ref_affine):
            channels.append(vol.data.astype(np.float32))
            continue
        moved = resample(vol.data, vol.affine, ref_shape, ref_affine, order=1, antialias=True)
        if np.any(vol.data != 0) and not np.any(moved != 0):
            raise InputFileError(
                vol.source, f"does not overlap the {modalities[0]} image's field of view (check the affines)"
            )
        channels.append(moved)
        del vol
    image = np.stack(channels).astype(np.float32, copy=False)

    mask_array = None
    if mask is not None:
        vol = read_nifti_file(mask, limits, allow_bad_affine=True)
        sources["mask"] = _describe(vol)
        check_mask_values(vol)
        mask_array = mask_on_grid(vol, ref_shape, ref_affine, modalities[0], resample=resample_masks)

    stats = [brain_stats(c) for c in image]
    attrs = {
        "subject": subject,
        "modalities": modalities,
        "sources": sources,
        "reference": {"modality": modalities[0], **_grid_info(ref_shape, ref_affine)},
        "norm": {
            "mean": [m for m, _ in stats],
            "std": [s for _, s in stats],
            "region": "brain",
            "brain_fraction": BRAIN_FRACTION,
            "robust_percentile": ROBUST_PERCENTILE,
        },
        "has_mask": mask_array is not None,
        "lesion_voxels": int(mask_array.sum()) if mask_array is not None else None,
    }
    return PreparedCase(subject, modalities, image, mask_array, ref_affine, attrs)


def make_levels(case: PreparedCase, levels: list[str | int]) -> dict[str, LevelArrays]:
    """The native level plus one training level per entry of `levels` (see `grid.parse_level`).

    Cube levels ("64") hold the whole field of view; spacing levels ("2mm") are isotropic and
    cropped to the non-zero region. Every level is made by `grid.level_grid` + `grid.resample`,
    the same calls prediction uses to put a new case onto its model's level.
    """
    shape = case.image.shape[1:]
    mask = case.mask if case.mask is not None else np.zeros(shape, np.uint8)
    out = {NATIVE: LevelArrays(case.image, mask, case.affine, lookalikes=find_lookalikes(case.image, mask))}
    for level in levels:
        name = str(level)
        dst_shape, dst = level_grid(name, shape, case.affine, image=case.image)
        image = np.stack([resample(c, case.affine, dst_shape, dst, order=1, antialias=True) for c in case.image])
        level_mask = resample_mask(mask, case.affine, dst_shape, dst)
        out[name] = LevelArrays(image, level_mask, dst, lookalikes=find_lookalikes(image, level_mask))
    return out


# --- a dataset ------------------------------------------------------------------------------
@dataclass
class ConvertReport:
    """What a conversion did."""

    converted: int
    skipped: int
    failed: list[Problem]
    store: str
    seconds: float

    def summary(self) -> str:
        lines = [f"converted {self.converted}, skipped {self.skipped} (already complete), failed {len(self.failed)}"]
        lines += [str(p) for p in self.failed]
        return "\n".join(lines)


def _source_checksums(case: CaseFiles) -> dict[str, str]:
    sums = {m: sha256_of(p) for m, p in case.images.items() if Path(p).is_file()}
    if case.mask is not None and Path(case.mask).is_file():
        sums["mask"] = sha256_of(case.mask)
    return sums


def _recorded_checksums(store: StrokeStore, subject: str) -> dict[str, str] | None:
    if not store.is_complete(subject):
        return None
    sources = store.meta(subject).get("sources", {})
    return {k: v.get("sha256") for k, v in sources.items()}


def convert_subject(
    case: CaseFiles,
    store_url: str,
    levels: list[str],
    storage_options: dict | None = None,
    limits: ImageLimits = ImageLimits(),
    resample_masks: bool = False,
) -> tuple[str, str, list[Problem]]:
    """Convert one subject into an existing store; returns (status, subject, problems).

    status is "converted", "skipped" (complete with the same source checksums) or "failed".
    Never raises for bad input, so one subject cannot stop the others.
    """
    try:
        store = StrokeStore.open(store_url, mode="r+", storage_options=storage_options)
        if _recorded_checksums(store, case.subject) == _source_checksums(case):
            store.drop_old_versions(case.subject)  # left by a writer killed after its switch
            return "skipped", case.subject, []
        prepared = load_case(case.images, case.mask, subject=case.subject, limits=limits,
                             resample_masks=resample_masks)
        prepared.attrs["layout"] = case.layout
        store.write_subject(case.subject, make_levels(prepared, levels), prepared.attrs)
        return "converted", case.subject, []
    except InputFileError as exc:
        return "failed", case.subject, [Problem(case.subject, exc.path, exc.problem)]
    except Exception as exc:  # an unexpected failure is still one subject's failure
        return "failed", case.subject, [Problem(case.subject, str(store_url), _short(exc))]


def check_levels(levels: list[str | int]) -> list[str]:
    """Training level names, validated: cube edges (64, "128") and spacings ("2mm").

    Raises:
        ConfigError: an unknown name, "native" (always written), or a repeated level.
    """
    out = []
    for level in levels:
        try:
            spec = parse_level(level)
        except ValueError as exc:
            raise ConfigError(f"levels: {exc}") from None
        if spec.kind == "native":
            raise ConfigError("levels: 'native' is always written; list only training levels")
        out.append(str(level).strip())
    if len(set(out)) != len(out):
        raise ConfigError(f"levels: {out} lists a level twice")
    return out


def convert_dataset(
    dataset: str,
    output: str,
    modalities: list[str] | None = None,
    layout: str = "auto",
    levels: list[str | int] = [64, 128],  # noqa: B006 - part of the public signature, never mutated
    normalization: str = "zscore",
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    storage_options: dict | None = None,
    parallel: bool = True,
    limits: ImageLimits = ImageLimits(),
    resample_masks: bool = False,
) -> ConvertReport:
    """Convert a NIfTI dataset into a Zarr store, one Ray task per subject.

    Resumable: complete subjects whose source files are unchanged are skipped, partial ones
    are rewritten, changed ones reconverted. `parallel=False` converts in this process (no
    Ray), which also works for stores only this process can see, such as memory:// URLs.
    `limits` bounds what any image header may declare (`nifti.ImageLimits`); a mask on
    another grid than its reference modality fails its subject unless `resample_masks`.
    """
    start = time.perf_counter()
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {normalization!r}; known: {', '.join(NORMALIZATIONS)}")
    levels = check_levels(levels)
    # Ray tasks run in working directories of their own: local paths are made absolute here.
    dataset, output = absolute(dataset), absolute(output)
    found = open_dataset(dataset, layout)
    chosen = found.resolve(modalities)
    cases, problems = found.discover(chosen, require_mask=True)
    if not cases and not problems:
        raise InputFileError(found.root, f"no subjects found for the {found.layout} layout")
    check_output(output)
    with writer_lock(output, "convert", storage_options):
        try:
            store = StrokeStore.create(
                output, chosen, [NATIVE, *levels], normalization,
                storage_options=storage_options, layout=found.layout,
            )
        except StoreError:
            raise  # already one line naming the store; the CLI adds the flags of its settings
        except (ValueError, OSError) as exc:
            raise StrokeRayError(str(exc)) from None

        options = dict(levels=levels, storage_options=storage_options, limits=limits,
                       resample_masks=resample_masks)
        counts = {"converted": 0, "skipped": 0, "failed": 0}
        failed = list(problems)
        bar = tqdm(total=len(cases), unit="subject", desc="convert", disable=not progress)

        def record(result: tuple[str, str, list[Problem]]) -> None:
            status, _, subject_problems = result
            counts[status] += 1
            failed.extend(subject_problems)
            bar.update(1)
            bar.set_postfix(failed=len(failed), refresh=False)

        try:
            if parallel and cases:
                _convert_on_ray(cases, store.url, options, address, num_cpus, record)
            else:
                for case in cases:
                    record(convert_subject(case, store.url, **options))
        finally:
            bar.close()
    return ConvertReport(counts["converted"], counts["skipped"], failed, store.url, time.perf_counter() - start)


def _convert_on_ray(cases, store_url, options, address, num_cpus, record) -> None:
    import ray

    connect(address, num_cpus=num_cpus)
    task = ray.remote(convert_subject).options(num_cpus=1, max_retries=0)
    pending = {task.remote(case, store_url, **options): case for case in cases}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                case = pending.pop(ref)
                try:
                    record(ray.get(ref))
                except ray.exceptions.RayError as exc:  # the worker died (e.g. out of memory)
                    record(("failed", case.subject, [Problem(case.subject, str(store_url), _short(exc))]))
    except KeyboardInterrupt:
        # Finished subjects are already complete in the store; stop the rest.
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
