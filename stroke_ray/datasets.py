"""Finding the cases of a dataset on disk: ISLES'22 and ATLAS R2.0 folder layouts.

Discovery only looks at file names; it never opens an image. Problems that concern one
subject (a missing modality, a missing mask) are collected and returned beside the good
cases, so one broken subject never stops a whole dataset; problems with the request itself
(an unknown modality or layout, a missing root folder) raise at once.

ISLES'22::

    <root>/rawdata/sub-X/ses-Y/sub-X_ses-Y_{dwi,adc,flair}.nii.gz
    <root>/derivatives/sub-X/ses-Y/sub-X_ses-Y_msk.nii.gz

ATLAS R2.0 (any nesting above the subject folder, e.g. ``Training/R001/``)::

    <root>/**/sub-X/ses-Y/anat/sub-X_ses-Y_space-MNI152NLin2009aSym_T1w.nii.gz
    <root>/**/sub-X/ses-Y/anat/sub-X_ses-Y_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz

The subject id is ``sub-X``; ``_ses-Y`` is appended only when a subject has several sessions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stroke_ray.errors import ConfigError, InputFileError
from stroke_ray.files import NIFTI_SUFFIXES

LAYOUT_MODALITIES: dict[str, list[str]] = {"isles22": ["dwi", "adc", "flair"], "atlas": ["t1w"]}

ATLAS_SPACE = "space-MNI152NLin2009aSym"
ATLAS_IMAGE = f"_{ATLAS_SPACE}_T1w"
ATLAS_MASK = f"_{ATLAS_SPACE}_label-L_desc-T1lesion_mask"


@dataclass
class CaseFiles:
    """The files of one subject: images by modality (in the order asked) and the mask."""

    subject: str
    images: dict[str, Path]
    mask: Path | None
    layout: str


@dataclass
class Problem:
    """Why one subject (or one of its files) cannot be used."""

    subject: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.path}: {self.problem}"


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_root(root: str | Path) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise InputFileError(path, "dataset folder does not exist" if not path.exists() else "not a folder")
    return path


def detect_layout(root: str | Path) -> str:
    """'isles22' when there is a rawdata/ folder, 'atlas' when MNI-space T1w files exist."""
    path = _check_root(root)
    if (path / "rawdata").is_dir():
        return "isles22"
    for suffix in NIFTI_SUFFIXES:
        if next(path.rglob(f"sub-*{ATLAS_IMAGE}{suffix}"), None) is not None:
            return "atlas"
    raise InputFileError(
        path,
        "cannot tell the dataset layout: no rawdata/ folder (ISLES'22) and no "
        f"*{ATLAS_IMAGE}.nii.gz files (ATLAS R2.0); pass layout explicitly",
    )


def resolve_modalities(layout: str, modalities: list[str] | None) -> list[str]:
    """Check a modality selection against a layout; None means all of the layout's."""
    if layout not in LAYOUT_MODALITIES:
        raise ConfigError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUT_MODALITIES)}")
    known = LAYOUT_MODALITIES[layout]
    if modalities is None:
        return list(known)
    chosen = [m.strip().lower() for m in modalities if m.strip()]
    if not chosen:
        raise ConfigError(f"no modality selected; known for {layout}: {', '.join(known)}")
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ConfigError(
            f"unknown modality {', '.join(map(repr, unknown))} for layout {layout}; "
            f"known: {', '.join(known)}"
        )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"modality listed twice in {chosen}")
    return chosen


def _subject_ids(sessions: dict[str, list[str]]) -> dict[tuple[str, str], str]:
    """(sub, ses) -> subject id; the session is kept only for multi-session subjects."""
    ids = {}
    for sub, sess in sessions.items():
        for ses in sess:
            ids[(sub, ses)] = sub if len(sess) == 1 or not ses else f"{sub}_{ses}"
    return ids


def _discover_isles(
    root: Path, modalities: list[str], require_mask: bool
) -> tuple[list[CaseFiles], list[Problem]]:
    raw, derivatives = root / "rawdata", root / "derivatives"
    sessions: dict[str, list[str]] = {}
    for sub_dir in sorted(p for p in raw.glob("sub-*") if p.is_dir()):
        ses = sorted(p.name for p in sub_dir.glob("ses-*") if p.is_dir())
        sessions[sub_dir.name] = ses or [""]
    ids = _subject_ids(sessions)
    cases, problems = [], []
    for (sub, ses), subject in ids.items():
        folder = raw / sub / ses if ses else raw / sub
        prefix = f"{sub}_{ses}" if ses else sub
        images, missing = {}, []
        for modality in modalities:
            found = _find_nifti(folder, f"{prefix}_{modality}")
            if found is None:
                missing.append(Problem(subject, str(folder / f"{prefix}_{modality}.nii.gz"), f"missing {modality} image"))
            else:
                images[modality] = found
        mask_dir = derivatives / sub / ses if ses else derivatives / sub
        mask = _find_nifti(mask_dir, f"{prefix}_msk")
        if mask is None and require_mask:
            missing.append(Problem(subject, str(mask_dir / f"{prefix}_msk.nii.gz"), "missing lesion mask"))
        if missing:
            problems.extend(missing)
        else:
            cases.append(CaseFiles(subject, images, mask, "isles22"))
    return cases, problems


def _discover_atlas(
    root: Path, modalities: list[str], require_mask: bool
) -> tuple[list[CaseFiles], list[Problem]]:
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
    ids = _subject_ids(sessions)
    cases, problems = [], []
    for (sub, ses), subject in sorted(ids.items(), key=lambda kv: kv[1]):
        anats = folders[(sub, ses)]
        if len(anats) > 1:
            problems.append(Problem(subject, str(anats[1]), f"same subject/session also in {anats[0]}"))
            continue
        anat, prefix = anats[0], f"{sub}_{ses}"
        image = _find_nifti(anat, f"{prefix}{ATLAS_IMAGE}")
        mask = _find_nifti(anat, f"{prefix}{ATLAS_MASK}")
        missing = []
        if image is None:
            missing.append(Problem(subject, str(anat / f"{prefix}{ATLAS_IMAGE}.nii.gz"), "missing t1w image"))
        if mask is None and require_mask:
            missing.append(Problem(subject, str(anat / f"{prefix}{ATLAS_MASK}.nii.gz"), "missing lesion mask"))
        if missing:
            problems.extend(missing)
        else:
            cases.append(CaseFiles(subject, {"t1w": image}, mask, "atlas"))
    return cases, problems


def discover(
    root: str | Path,
    modalities: list[str] | None = None,
    layout: str = "auto",
    require_mask: bool = True,
) -> tuple[list[CaseFiles], list[Problem]]:
    """All usable cases below `root` (sorted by subject) and the problems of the others."""
    path = _check_root(root)
    if layout == "auto":
        layout = detect_layout(path)
    chosen = resolve_modalities(layout, modalities)
    finder = _discover_isles if layout == "isles22" else _discover_atlas
    cases, problems = finder(path, chosen, require_mask)
    cases.sort(key=lambda c: c.subject)
    return cases, problems
