"""ISLES'22: the released ISLES-2022 archive and the challenge repository's example layout.

Released archive (``ISLES-2022/`` as unpacked; the root may also be the folder above it)::

    <root>/sub-X/ses-Y/dwi/sub-X_ses-Y_dwi.nii.gz      (+ .json sidecar)
    <root>/sub-X/ses-Y/dwi/sub-X_ses-Y_adc.nii.gz      (+ .json)
    <root>/sub-X/ses-Y/anat/sub-X_ses-Y_FLAIR.nii.gz   (+ .json)
    <root>/derivatives/sub-X/ses-Y/sub-X_ses-Y_msk.nii.gz

Repository example (``rawdata/``, as ``../shared/data/isles22-sample``)::

    <root>/rawdata/sub-X/ses-Y/sub-X_ses-Y_{dwi,adc,flair}.nii.gz
    <root>/derivatives/sub-X/ses-Y/sub-X_ses-Y_msk.nii.gz

Modality suffixes match case-insensitively (``_FLAIR`` and ``_flair``).
"""

from __future__ import annotations

from pathlib import Path

from stroke_ray.layouts.base import CaseFiles, Problem, find_nifti, subject_ids

__all__ = ["NAME", "MODALITIES", "LOOKS_FOR", "matches", "modalities", "discover"]

NAME = "isles22"
MODALITIES = ["dwi", "adc", "flair"]
LOOKS_FOR = "rawdata/sub-*/ or sub-*/ses-*/{dwi,anat}/ with *_dwi/*_FLAIR images (ISLES'22)"
# Where each modality lives in a session folder of the released archive (BIDS datatypes).
ARCHIVE_FOLDERS = {"dwi": "dwi", "adc": "dwi", "flair": "anat"}


def _is_archive(root: Path) -> bool:
    for session in root.glob("sub-*/ses-*"):
        for modality, folder in ARCHIVE_FOLDERS.items():
            if any(p.name.lower().startswith(f"{session.parent.name}_{session.name}_{modality}.nii".lower())
                   for p in (session / folder).glob("sub-*")):
                return True
    return False


def matches(root: Path) -> bool:
    """A rawdata/ folder with subjects, or archive sessions holding DWI/ADC/FLAIR images."""
    return any((root / "rawdata").glob("sub-*")) or _is_archive(root)


def modalities(root: Path) -> list[str]:
    return list(MODALITIES)


def discover(root: Path, chosen: list[str], require_mask: bool) -> tuple[list[CaseFiles], list[Problem]]:
    """Cases of either variant: rawdata/ when present, else the archive's own layout."""
    archive = not (root / "rawdata").is_dir()
    subjects_dir = root if archive else root / "rawdata"
    sessions: dict[str, list[str]] = {}
    for sub_dir in sorted(p for p in subjects_dir.glob("sub-*") if p.is_dir()):
        ses = sorted(p.name for p in sub_dir.glob("ses-*") if p.is_dir())
        sessions[sub_dir.name] = ses or [""]
    cases, problems = [], []
    for (sub, ses), subject in subject_ids(sessions).items():
        session = subjects_dir / sub / ses if ses else subjects_dir / sub
        prefix = f"{sub}_{ses}" if ses else sub
        images, missing = {}, []
        for modality in chosen:
            folder = session / ARCHIVE_FOLDERS[modality] if archive else session
            # The archive spells FLAIR in capitals; the example in lower case.
            stem = f"{prefix}_{'FLAIR' if archive and modality == 'flair' else modality}"
            found = find_nifti(folder, stem, any_case=True)
            if found is None:
                missing.append(Problem(subject, str(folder / f"{stem}.nii.gz"), f"missing {modality} image"))
            else:
                images[modality] = found
        mask_dir = root / "derivatives" / sub / ses if ses else root / "derivatives" / sub
        mask = find_nifti(mask_dir, f"{prefix}_msk", any_case=True)
        if mask is None and require_mask:
            missing.append(Problem(subject, str(mask_dir / f"{prefix}_msk.nii.gz"), "missing lesion mask"))
        if missing:
            problems.extend(missing)
        else:
            cases.append(CaseFiles(subject, images, mask, NAME))
    return cases, problems
