"""ATLAS R2.0 (any nesting above the subject folder, e.g. ``Training/R001/``)::

    <root>/**/sub-X/ses-Y/anat/sub-X_ses-Y_space-MNI152NLin2009aSym_T1w.nii.gz
    <root>/**/sub-X/ses-Y/anat/sub-X_ses-Y_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from stroke_ray.files import NIFTI_SUFFIXES
from stroke_ray.layouts.base import CaseFiles, Problem, find_nifti, subject_ids

__all__ = ["NAME", "MODALITIES", "LOOKS_FOR", "NESTED", "matches", "modalities", "discover"]

NAME = "atlas"
MODALITIES = ["t1w"]
ATLAS_SPACE = "space-MNI152NLin2009aSym"
ATLAS_IMAGE = f"_{ATLAS_SPACE}_T1w"
ATLAS_MASK = f"_{ATLAS_SPACE}_label-L_desc-T1lesion_mask"
LOOKS_FOR = f"**/sub-*/ses-*/anat/*{ATLAS_IMAGE}.nii.gz (ATLAS R2.0)"
# Found at any depth below the root already: no need to look one level down as well.
NESTED = True


def matches(root: Path) -> bool:
    return any(next(root.rglob(f"sub-*{ATLAS_IMAGE}{suffix}"), None) is not None for suffix in NIFTI_SUFFIXES)


def modalities(root: Path) -> list[str]:
    return list(MODALITIES)


def discover(root: Path, chosen: list[str], require_mask: bool) -> tuple[list[CaseFiles], list[Problem]]:
    # Every sub-*/ses-*/anat folder anywhere below the root is a candidate session.
    anat_dirs = sorted(p for p in root.rglob("anat") if p.is_dir() and p.parent.name.startswith("ses-")
                       and p.parent.parent.name.startswith("sub-"))
    sessions: dict[str, list[str]] = defaultdict(list)
    folders: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for anat in anat_dirs:
        sub, ses = anat.parent.parent.name, anat.parent.name
        if ses not in sessions[sub]:
            sessions[sub].append(ses)
        folders[(sub, ses)].append(anat)
    cases, problems = [], []
    for (sub, ses), subject in sorted(subject_ids(sessions).items(), key=lambda kv: kv[1]):
        anats = folders[(sub, ses)]
        if len(anats) > 1:
            problems.append(Problem(subject, str(anats[1]), f"same subject/session also in {anats[0]}"))
            continue
        anat, prefix = anats[0], f"{sub}_{ses}"
        image = find_nifti(anat, f"{prefix}{ATLAS_IMAGE}")
        mask = find_nifti(anat, f"{prefix}{ATLAS_MASK}")
        missing = []
        if image is None:
            missing.append(Problem(subject, str(anat / f"{prefix}{ATLAS_IMAGE}.nii.gz"), "missing t1w image"))
        if mask is None and require_mask:
            missing.append(Problem(subject, str(anat / f"{prefix}{ATLAS_MASK}.nii.gz"), "missing lesion mask"))
        if missing:
            problems.extend(missing)
        else:
            cases.append(CaseFiles(subject, {"t1w": image}, mask, NAME))
    return cases, problems
