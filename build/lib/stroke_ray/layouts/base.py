"""What every dataset layout finds: the files of each case, and the problems of the others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stroke_ray.files import NIFTI_SUFFIXES

__all__ = ["CaseFiles", "Problem", "find_nifti", "subject_ids"]


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


def find_nifti(folder: Path, stem: str, any_case: bool = False) -> Path | None:
    """`folder/stem.nii.gz` or `folder/stem.nii`; `any_case` matches the stem case-insensitively
    (the ISLES-2022 archive writes `_FLAIR`, the challenge's example `_flair`)."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    if any_case and folder.is_dir():
        wanted = {f"{stem}{suffix}".lower() for suffix in NIFTI_SUFFIXES}
        for candidate in sorted(folder.iterdir()):
            if candidate.name.lower() in wanted and candidate.is_file():
                return candidate
    return None


def subject_ids(sessions: dict[str, list[str]]) -> dict[tuple[str, str], str]:
    """(sub, ses) -> subject id; the session is kept only for multi-session subjects."""
    ids = {}
    for sub, sess in sessions.items():
        for ses in sess:
            ids[(sub, ses)] = sub if len(sess) == 1 or not ses else f"{sub}_{ses}"
    return ids
