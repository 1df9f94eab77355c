"""Writing synthetic cases in the ISLES'22 or ATLAS R2.0 layout, byte-identical for a seed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from stroke_ray.errors import StrokeRayError
from stroke_ray.files import atomic_write_bytes, atomic_write_text
from stroke_ray.grid import spacing_of
from stroke_ray.outputs import claim_folder
from stroke_ray.synth.anatomy import mni_anatomy
from stroke_ray.synth.cases import SynthCase, check_layout, synth_case
from stroke_ray.synth.settings import SynthSettings, settings_for

__all__ = ["ATLAS_SPACE", "SYNTH_MARKER", "generate_dataset", "write_case"]

ATLAS_SPACE = "space-MNI152NLin2009aSym"
# In the root of every folder synth makes: synth writes only into such a folder (or a new
# or empty one).
SYNTH_MARKER = ".stroke-ray-synth"


def write_case(case: SynthCase, root: str | Path, seed: int = 0) -> list[Path]:
    """Write `case` under `root` in its layout's file names (each file atomically)."""
    root = Path(root)
    sub = case.subject
    written = []
    if case.layout == "atlas":
        folder = root / sub / "ses-1" / "anat"
        prefix = f"{sub}_ses-1_{ATLAS_SPACE}"
        image, affine = case.images["t1w"]
        written.append(_write_nifti(folder / f"{prefix}_T1w.nii.gz", image, affine))
        written.append(_write_json(folder / f"{prefix}_T1w.json", _sidecar("t1w", affine, seed, case)))
        written.append(_write_nifti(folder / f"{prefix}_label-L_desc-T1lesion_mask.nii.gz",
                                    case.mask, case.mask_affine))
        return written
    raw = root / "rawdata" / sub / "ses-0001"
    for modality, (image, affine) in case.images.items():
        stem = f"{sub}_ses-0001_{modality}"
        written.append(_write_nifti(raw / f"{stem}.nii.gz", image, affine))
        written.append(_write_json(raw / f"{stem}.json", _sidecar(modality, affine, seed, case)))
    deriv = root / "derivatives" / sub / "ses-0001"
    written.append(_write_nifti(deriv / f"{sub}_ses-0001_msk.nii.gz", case.mask, case.mask_affine))
    return written


def generate_dataset(
    output: str | Path,
    num_cases: int = 8,
    layout: str = "isles22",
    seed: int = 0,
    progress: bool = True,
    profile: str | SynthSettings = "train",
) -> list[str]:
    """Write `num_cases` synthetic cases in the ISLES'22 or ATLAS R2.0 layout; return subject ids.

    The same (seed, case index, profile) always gives byte-identical files, and every file
    is written under a temporary name and renamed, so an interrupted run leaves no partial
    file and re-running it completes the dataset.

    Args:
        profile: `train` (the default), `shifted` (held-out cases from a distribution
            training never sees) or a SynthSettings; see docs/synthetic.md.

    Writes only into a new or empty folder, or one it made itself (the `SYNTH_MARKER`
    file), so it can never overwrite a real dataset.

    Raises:
        StrokeRayError: for an unknown layout or profile, or num_cases < 1.
        InputFileError: if `output` is not a folder, or holds files synth did not make.
    """
    check_layout(layout)
    settings = settings_for(profile)
    if int(num_cases) < 1:
        raise StrokeRayError(f"num_cases must be at least 1, got {num_cases}")
    root = Path(output)
    claim_folder(root, SYNTH_MARKER, "stroke-ray synth", {"layout": layout, "seed": int(seed)})
    atomic_write_text(root / "README.md", _readme(layout))
    _write_json(root / "dataset_description.json", _description(layout, seed, settings.profile))

    mni_anatomy()  # load before the bar starts, so the bar shows the per-case rate
    subjects = []
    for index in tqdm(range(int(num_cases)), desc=f"synth {layout} {settings.profile}", unit="case", disable=not progress):
        case = synth_case(index, layout=layout, seed=seed, settings=settings)
        write_case(case, root, seed=seed)
        subjects.append(case.subject)
    return subjects


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # Own gzip with a fixed header time, so identical arrays give identical files.
    return atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _write_json(path: Path, payload: dict) -> Path:
    return atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def _sidecar(modality: str, affine: np.ndarray, seed: int, case: SynthCase) -> dict:
    spacing = spacing_of(affine)
    sidecar = {
        "Synthetic": True,
        "GeneratedBy": "stroke-ray synth",
        "Seed": int(seed),
        "Modality": "MR",
        "MagneticFieldStrength": case.info.get("field_strength_t", 3.0),
        "VoxelSizeMm": [round(float(s), 4) for s in spacing],
        "SyntheticLesion": case.info,
    }
    if modality == "dwi":
        sidecar["DiffusionBValue"] = 1000.0
    if modality == "adc":
        sidecar["Units"] = "1e-3 mm^2/s"
    if modality == "flair":
        # A 1 mm gap between slices, as the real FLAIR has (4 mm slices every 5 mm).
        between = float(spacing.max())
        sidecar.update(SliceThickness=between - 1.0, SpacingBetweenSlices=between, InversionTime=2850.0)
    return sidecar


def _description(layout: str, seed: int, profile: str) -> dict:
    return {
        "Name": f"stroke-ray synthetic {'ISLES22' if layout == 'isles22' else 'ATLAS R2.0'}-like stroke cases",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "Synthetic": True,
        "GeneratedBy": [{"Name": "stroke-ray synth", "Description": f"layout={layout} seed={seed} profile={profile}"}],
        "License": "synthetic; anatomy from the ICBM 2009a template under the MNI/McGill notice in README.md",
    }


def _readme(layout: str) -> str:
    files = (
        "rawdata/sub-synthNNNN/ses-0001/sub-synthNNNN_ses-0001_{dwi,adc,flair}.nii.gz\n"
        "    derivatives/sub-synthNNNN/ses-0001/sub-synthNNNN_ses-0001_msk.nii.gz"
        if layout == "isles22" else
        f"sub-synthNNNN/ses-1/anat/sub-synthNNNN_ses-1_{ATLAS_SPACE}_T1w.nii.gz\n"
        f"    sub-synthNNNN/ses-1/anat/sub-synthNNNN_ses-1_{ATLAS_SPACE}_label-L_desc-T1lesion_mask.nii.gz"
    )
    return (
        "# Synthetic stroke dataset (NOT patient data)\n\n"
        "Every image here is synthetic, made by `stroke-ray synth` from the MNI ICBM152 2009\n"
        "template tissue maps with simulated lesions, bias field and noise. No patient data.\n"
        "Use it to exercise the pipeline, never to judge clinical performance.\n\n"
        f"Layout:\n\n    {files}\n\n"
        "Anatomy: MNI ICBM152 2009a nonlinear symmetric template (1 mm T1, GM and WM maps) as\n"
        "packaged by nilearn. Cite: Fonov et al., NeuroImage 54(1):313-327 (2011); Fonov et al.,\n"
        "NeuroImage 47:S102 (2009).\n\n"
        "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal\n"
        "Neurological Institute, McGill University. Permission to use, copy, modify, and\n"
        "distribute this software and its documentation for any purpose and without fee is\n"
        "hereby granted, provided that the above copyright notice appear in all copies. The\n"
        "authors and McGill University make no representations about the suitability of this\n"
        "software for any purpose. It is provided \"as is\" without express or implied warranty.\n"
    )
