"""Lesion masks for new cases, written in each case's own space.

`predict_dataset` runs a trained checkpoint over a BIDS-like folder (ISLES'22 or ATLAS
layout) or over one case given as {modality: file}. Every case goes through the same path
as training data (`ingest.load_case`: validation, resampling onto the reference modality's
grid, normalisation statistics) and `segmenter.Segmenter` (`inference.predict_case`:
resampling to the training level and back, mirroring test-time augmentation; then the
model's postprocessing), so the mask comes out on the reference modality's own voxel grid
and is written with that file's header: same shape, same affine, same qform/sform codes.

Outputs in the output folder::

    <subject>_mask.nii.gz    uint8 lesion mask
    <subject>_prob.nii.gz    float32 foreground probability (save_probability=True)
    predictions.csv          one row per case: volume, lesion count, ISLES metrics
    predictions.json         the same rows plus the model reference and the failed cases

Every file is written to a temporary name and renamed into place, so an interrupted run
never leaves a half-written file. A case that cannot be read is reported and skipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cc3d
import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from stroke_ray.datasets import CaseFiles, Problem, discover
from stroke_ray.errors import ConfigError, InputFileError, StrokeRayError
from stroke_ray.files import atomic_write_bytes, strip_nifti_suffix
from stroke_ray.grid import spacing_of
from stroke_ray.ingest import load_case
from stroke_ray.metrics import METRIC_KEYS, isles_metrics
from stroke_ray.model_ref import CHAMPION_URI
from stroke_ray.nifti import ImageLimits
from stroke_ray.outputs import check_apart
from stroke_ray.segmenter import Segmenter

__all__ = [
    "CSV_COLUMNS",
    "lesion_stats",
    "like_reference",
    "nifti_bytes",
    "predict_dataset",
    "save_nifti",
    "PredictReport",
]

CSV_COLUMNS = ("subject", "mask_file", "volume_ml", "lesion_count", "truth_volume_ml", *METRIC_KEYS)


# --------------------------------------------------------------------------- outputs


def lesion_stats(mask: np.ndarray, affine: np.ndarray) -> dict[str, float | int]:
    """Lesion volume in ml and the number of 26-connected lesions."""
    binary = np.ascontiguousarray(mask > 0, dtype=np.uint8)
    voxel_ml = float(np.prod(spacing_of(affine))) / 1000.0
    _, count = cc3d.connected_components(binary, connectivity=26, return_N=True)
    return {"volume_ml": round(float(binary.sum()) * voxel_ml, 4), "lesion_count": int(count)}


def like_reference(volume: np.ndarray, reference: nib.spatialimages.SpatialImage, dtype) -> nib.Nifti1Image:
    """`volume` as a NIfTI image carrying `reference`'s header: same grid, affine and codes.

    The header is copied rather than rebuilt from an affine so that qform/sform codes, units
    and the exact stored affine survive; only the data type and scaling change.
    """
    shape = tuple(reference.shape[:3])
    data = np.asarray(volume, dtype=dtype)
    if data.shape != shape:
        raise StrokeRayError(f"prediction shape {data.shape} does not match the reference grid {shape}")
    klass = nib.Nifti2Image if isinstance(reference, nib.Nifti2Image) else nib.Nifti1Image
    header = klass.header_class.from_header(reference.header)
    # Given the reference's own affine, nibabel leaves the copied qform/sform and codes as is.
    image = klass(data, reference.affine, header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = float(data.min(initial=0)), float(data.max(initial=0))
    return image


def nifti_bytes(image: nib.Nifti1Image, compress: bool = True) -> bytes:
    """The image as the bytes of a .nii.gz (or .nii) file."""
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def save_nifti(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Write `image` to `path` (.nii.gz or .nii) atomically."""
    path = Path(path)
    atomic_write_bytes(path, nifti_bytes(image, compress=path.name.endswith(".gz")))
    return path


# --------------------------------------------------------------------------- dataset


@dataclass
class PredictReport:
    """What a prediction run did: one row per written case and the cases it skipped."""

    predicted: int
    failed: list  # datasets.Problem
    rows: list[dict[str, Any]]
    output_dir: str
    model_ref: str
    model_version: str
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"predicted {self.predicted} case(s), {len(self.failed)} failed, in {self.seconds:.1f} s "
            f"with {self.model_ref} ({self.model_version}) -> {self.output_dir}"
        ]
        lines += [f"  failed: {p}" for p in self.failed]
        return "\n".join(lines)


def _subject_from_file(path: Path, modality: str) -> str:
    name = strip_nifti_suffix(path)
    if name.lower().endswith(f"_{modality.lower()}"):
        name = name[: -len(modality) - 1]
    return name or "case"


def _cases_for(inputs: str | Path | Mapping[str, str | Path], modalities: list[str], mask: str | Path | None):
    """(cases, problems) for a dataset folder or one explicit {modality: file} case."""
    if isinstance(inputs, Mapping):
        images = {str(k): Path(v) for k, v in inputs.items()}
        missing = [m for m in modalities if m not in images]
        subject = _subject_from_file(images[modalities[0]], modalities[0]) if modalities[0] in images else "case"
        if missing:
            problem = Problem(subject, ", ".join(missing), f"missing modality {', '.join(missing)} "
                              f"(the model needs {', '.join(modalities)})")
            return [], [problem]
        case = CaseFiles(subject=subject, images={m: images[m] for m in modalities},
                         mask=Path(mask) if mask else None, layout="files")
        return [case], []
    root = Path(inputs)
    if not root.exists():
        raise InputFileError(root, "no such dataset folder")
    return discover(root, modalities=modalities, layout="auto", require_mask=False)


def _write_tables(out: Path, rows: list[dict], failed: list, model_ref: str, version: str) -> list[Path]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    csv_path, json_path = out / "predictions.csv", out / "predictions.json"
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    doc = {
        "model": model_ref,
        "model_version": version,
        "cases": rows,
        "failed": [asdict(p) | {"message": str(p)} for p in failed],
    }
    atomic_write_bytes(json_path, (json.dumps(doc, indent=2) + "\n").encode())
    return [csv_path, json_path]


def _keep_earlier_results(out: Path, subjects: list[str], save_probability: bool, overwrite: bool) -> None:
    """Refuse to replace files of an earlier run unless asked to."""
    if overwrite or not out.is_dir():
        return
    names = ["predictions.csv", "predictions.json"] + [f"{s}_mask.nii.gz" for s in subjects]
    names += [f"{s}_prob.nii.gz" for s in subjects] if save_probability else []
    existing = [name for name in names if (out / name).exists()]
    if existing:
        raise InputFileError(
            out, f"already holds results of an earlier run ({', '.join(existing[:3])}"
                 f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them or choose another folder"
        )


def predict_dataset(
    inputs: str | Path | Mapping[str, str | Path],
    model_ref: str | Path = CHAMPION_URI,
    output_dir: str | Path = "predictions",
    tracking_uri: str | None = None,
    modalities: list[str] | None = None,
    save_probability: bool = False,
    device: str | None = None,
    progress: bool = True,
    mask: str | Path | None = None,
    threshold: float | None = None,
    subjects: Sequence[str] | None = None,
    limits: ImageLimits | None = None,
    resample_masks: bool = False,
    overwrite: bool = False,
    tta_axes: Sequence[int] | None = None,
    min_lesion_ml: float | None = None,
) -> PredictReport:
    """Predict a lesion mask for every case of `inputs`, written in the case's own space.

    `inputs` is a dataset folder or {modality: file} for one case (`mask` optionally gives
    that case's ground truth for metrics); `subjects` keeps only those cases of a folder.
    `modalities` checks the channels against the checkpoint's (default: the checkpoint's
    own list). Every file is read header first under `limits` (default `ImageLimits()`).
    `threshold` and `min_lesion_ml` (small-component removal) default to the model's stored
    postprocessing, `tta_axes` (test-time mirroring; () = none) to all three axes.
    Unreadable cases are reported in the result and skipped; only a bad model or output
    folder raises. The output folder may not be or hold any input (the dataset folder, an
    image or a mask), and files of an earlier run there are kept unless `overwrite`.

    Raises:
        InputFileError: an output folder that holds an input, or that already holds
            results (without `overwrite`), or that cannot be made; no case found.
        ConfigError: a model trained on other modalities than `modalities`.
    """
    start = time.perf_counter()
    given = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    check_apart(output_dir, [*given, *([mask] if mask else [])])
    segmenter = Segmenter.load(model_ref, tracking_uri=tracking_uri, device=device, threshold=threshold,
                               tta_axes=tta_axes, min_lesion_ml=min_lesion_ml)
    needed = segmenter.modalities
    if modalities is not None and list(modalities) != needed:
        raise ConfigError(
            f"{model_ref}: the model was trained on {', '.join(needed)}, not {', '.join(modalities)}"
        )
    cases, failed = _cases_for(inputs, needed, mask)
    failed = list(failed)
    if subjects is not None:
        wanted = list(dict.fromkeys(subjects))
        found = {c.subject for c in cases} | {p.subject for p in failed}
        failed = [p for p in failed if p.subject in wanted]
        failed += [Problem(s, str(inputs), "no such subject in the dataset") for s in wanted if s not in found]
        cases = [c for c in cases if c.subject in wanted]
    if not cases and not failed:
        raise InputFileError(str(inputs), "no cases found")

    out = Path(output_dir)
    check_apart(out, [path for case in cases for path in (*case.images.values(), case.mask) if path])
    _keep_earlier_results(out, [c.subject for c in cases], save_probability, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(out, f"cannot create the output folder ({exc.strerror})") from exc

    rows: list[dict[str, Any]] = []
    files: list[str] = []
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        try:
            prepared = load_case({m: case.images[m] for m in needed}, mask=case.mask, subject=case.subject,
                                 limits=limits or ImageLimits(), resample_masks=resample_masks)
            prediction = segmenter.predict(prepared)
            reference = nib.load(str(case.images[needed[0]]))
            mask_path = save_nifti(like_reference(prediction.mask, reference, np.uint8),
                                   out / f"{case.subject}_mask.nii.gz")
            files.append(str(mask_path))
            if save_probability:
                prob_path = save_nifti(like_reference(prediction.probability, reference, np.float32),
                                       out / f"{case.subject}_prob.nii.gz")
                files.append(str(prob_path))
            row: dict[str, Any] = {"subject": case.subject, "mask_file": mask_path.name}
            row.update(lesion_stats(prediction.mask, prediction.affine))
            if prepared.mask is not None:
                row["truth_volume_ml"] = lesion_stats(prepared.mask, prepared.affine)["volume_ml"]
                scores = isles_metrics(prediction.mask, prepared.mask, spacing_of(prepared.affine))
                row.update({k: float(scores[k]) for k in METRIC_KEYS})
            rows.append(row)
        except KeyboardInterrupt:
            raise
        except InputFileError as exc:
            failed.append(Problem(case.subject, exc.path, exc.problem))
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            failed.append(Problem(case.subject, str(next(iter(case.images.values()), "")),
                                  f"{type(exc).__name__}: {exc}"))
        # Tables after every case: an interrupted run still lists what it finished.
        _write_tables(out, rows, failed, str(model_ref), segmenter.version)

    if not cases:
        _write_tables(out, rows, failed, str(model_ref), segmenter.version)
    return PredictReport(
        predicted=len(rows),
        failed=failed,
        rows=rows,
        output_dir=str(out),
        model_ref=str(model_ref),
        model_version=segmenter.version,
        seconds=time.perf_counter() - start,
        files=files,
    )
