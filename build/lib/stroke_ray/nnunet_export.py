"""A stroke-ray store as an nnU-Net v2 raw dataset, so nnU-Net can train on the same cases.

`export_nnunet` writes every complete subject's native level (the reference modality's
grid, with its affine) as ``imagesTr/<subject>_<channel:04d>.nii.gz`` (raw intensities, one
file per modality in the store's channel order), its mask as ``labelsTr/<subject>.nii.gz``,
and ``dataset.json`` last (channel names DWI/ADC/FLAIR/T1w or the store's own, labels
background 0 / lesion 1), so a half-finished export is never mistaken for a dataset. It
writes only into a new or empty folder or one it made itself (``.stroke-ray-export``
marker), never over someone else's files; each file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from stroke_ray.errors import StrokeRayError
from stroke_ray.files import atomic_write_text
from stroke_ray.layouts.nnunet import channel_name, image_file, label_file
from stroke_ray.outputs import claim_folder
from stroke_ray.predict import save_nifti
from stroke_ray.store import NATIVE, StrokeStore

__all__ = ["EXPORT_MARKER", "ExportReport", "export_nnunet"]

EXPORT_MARKER = ".stroke-ray-export"
FILE_ENDING = ".nii.gz"


@dataclass
class ExportReport:
    """What an export wrote."""

    output: str
    subjects: list[str]
    modalities: list[str]

    def summary(self) -> str:
        return (f"exported {len(self.subjects)} case(s) ({', '.join(self.modalities)}) as an nnU-Net v2 "
                f"raw dataset to {self.output}")


def _nifti(volume: np.ndarray, affine: np.ndarray, dtype) -> nib.Nifti1Image:
    image = nib.Nifti1Image(np.asarray(volume, dtype=dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def export_nnunet(
    store_url: str,
    output: str | Path,
    storage_options: dict | None = None,
    progress: bool = True,
) -> ExportReport:
    """Write the store's complete subjects as an nnU-Net v2 raw dataset in `output`.

    Args:
        store_url: a stroke-ray store (local path or URL).
        output: the dataset folder to write (name it ``DatasetNNN_Name`` under
            ``nnUNet_raw`` for nnU-Net's own commands).
        storage_options: fsspec options of the store.
        progress: show a progress bar.

    Raises:
        InputFileError: the output folder holds files this command did not write.
        StrokeRayError: the store cannot be opened or has no complete subject.
    """
    try:
        store = StrokeStore.open(store_url, storage_options=storage_options)
    except FileNotFoundError as exc:
        raise StrokeRayError(str(exc)) from None
    subjects = store.subjects()
    if not subjects:
        raise StrokeRayError(f"{store_url}: the store has no complete subject to export")
    modalities = store.modalities
    out = Path(output)
    claim_folder(out, EXPORT_MARKER, "export-nnunet", {"store": str(store_url)})
    images_dir, labels_dir = out / "imagesTr", out / "labelsTr"
    images_dir.mkdir(exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    for subject in tqdm(subjects, desc="export", unit="case", disable=not progress):
        affine = store.affine(subject, NATIVE)
        image = store.image(subject, NATIVE)[...]
        for channel in range(len(modalities)):
            save_nifti(_nifti(image[channel], affine, np.float32),
                       image_file(images_dir, subject, channel, FILE_ENDING))
        save_nifti(_nifti(store.mask(subject, NATIVE)[...], affine, np.uint8),
                   label_file(labels_dir, subject, FILE_ENDING))
    description = {
        "name": out.name,
        "description": f"exported by stroke-ray export-nnunet from {store_url} (native level)",
        "channel_names": {str(i): channel_name(m) for i, m in enumerate(modalities)},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(subjects),
        "file_ending": FILE_ENDING,
        "stroke_ray": {"store": str(store_url), "level": NATIVE, "subjects": subjects,
                       "normalization_in_store": store.normalization},
    }
    # Last: until it exists the folder is not an nnU-Net dataset.
    atomic_write_text(out / "dataset.json", json.dumps(description, indent=2) + "\n")
    return ExportReport(str(out), subjects, modalities)
