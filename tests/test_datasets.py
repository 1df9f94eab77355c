"""Discovery of ISLES'22 and ATLAS R2.0 layouts (file names only, so empty files suffice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stroke_ray.datasets import LAYOUT_MODALITIES, detect_layout, discover
from stroke_ray.errors import ConfigError, InputFileError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def isles_session(root: Path, sub: str, ses: str, modalities=("dwi", "adc", "flair"), mask=True) -> None:
    for m in modalities:
        touch(root / "rawdata" / sub / ses / f"{sub}_{ses}_{m}.nii.gz")
    if mask:
        touch(root / "derivatives" / sub / ses / f"{sub}_{ses}_msk.nii.gz")


def atlas_session(root: Path, sub: str, ses: str, image=True, mask=True) -> None:
    anat = root / sub / ses / "anat"
    if image:
        touch(anat / f"{sub}_{ses}_space-MNI152NLin2009aSym_T1w.nii.gz")
    if mask:
        touch(anat / f"{sub}_{ses}_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz")


def test_real_isles_sample_is_found(isles_sample):
    cases, problems = discover(isles_sample)
    assert problems == []
    assert [c.subject for c in cases] == ["sub-strokecase0009"]
    case = cases[0]
    assert case.layout == "isles22"
    assert list(case.images) == ["dwi", "adc", "flair"]
    assert case.images["flair"].name == "sub-strokecase0009_ses-0001_flair.nii.gz"
    assert case.mask.name == "sub-strokecase0009_ses-0001_msk.nii.gz"


def test_isles_modality_picking_and_order(tmp_path):
    isles_session(tmp_path, "sub-01", "ses-1")
    cases, _ = discover(tmp_path, ["flair", "dwi"])
    assert list(cases[0].images) == ["flair", "dwi"]
    cases, _ = discover(tmp_path, ["dwi"])
    assert list(cases[0].images) == ["dwi"]


def test_unknown_modality_lists_known_ones(tmp_path):
    isles_session(tmp_path, "sub-01", "ses-1")
    with pytest.raises(ConfigError, match="'t2'.*known: dwi, adc, flair"):
        discover(tmp_path, ["dwi", "t2"])
    with pytest.raises(ConfigError, match="known: t1w"):
        discover(tmp_path, ["dwi"], layout="atlas")


def test_isles_problems_are_collected_per_subject(tmp_path):
    isles_session(tmp_path, "sub-01", "ses-1")
    isles_session(tmp_path, "sub-02", "ses-1", modalities=("dwi", "adc"))  # no flair
    isles_session(tmp_path, "sub-03", "ses-1", mask=False)
    cases, problems = discover(tmp_path)
    assert [c.subject for c in cases] == ["sub-01"]
    text = sorted(str(p) for p in problems)
    assert len(text) == 2
    assert text[0].startswith("sub-02: ") and text[0].endswith("sub-02_ses-1_flair.nii.gz: missing flair image")
    assert text[1].startswith("sub-03: ") and text[1].endswith("sub-03_ses-1_msk.nii.gz: missing lesion mask")
    # Without flair in the selection sub-02 is fine; without the mask requirement sub-03 is.
    cases, problems = discover(tmp_path, ["dwi", "adc"], require_mask=False)
    assert [c.subject for c in cases] == ["sub-01", "sub-02", "sub-03"] and problems == []
    assert cases[2].mask is None


def test_session_appended_only_for_multi_session_subjects(tmp_path):
    isles_session(tmp_path, "sub-01", "ses-1")
    isles_session(tmp_path, "sub-02", "ses-1")
    isles_session(tmp_path, "sub-02", "ses-2")
    cases, problems = discover(tmp_path)
    assert problems == []
    assert [c.subject for c in cases] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]
    assert "ses-2" in str(cases[2].images["dwi"])


def test_atlas_nested_layout(tmp_path):
    atlas_session(tmp_path / "Training" / "R001", "sub-r001s001", "ses-1")
    atlas_session(tmp_path / "Training" / "R001", "sub-r001s002", "ses-1", mask=False)
    atlas_session(tmp_path / "Training" / "R002", "sub-r002s001", "ses-1")
    atlas_session(tmp_path / "Training" / "R002", "sub-r002s002", "ses-1", image=False)
    assert detect_layout(tmp_path) == "atlas"
    cases, problems = discover(tmp_path)
    assert [c.subject for c in cases] == ["sub-r001s001", "sub-r002s001"]
    assert list(cases[0].images) == LAYOUT_MODALITIES["atlas"]
    assert cases[0].images["t1w"].name == "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"
    assert cases[0].mask.name.endswith("_label-L_desc-T1lesion_mask.nii.gz")
    assert sorted((p.subject, p.problem) for p in problems) == [
        ("sub-r001s002", "missing lesion mask"),
        ("sub-r002s002", "missing t1w image"),
    ]


def test_layout_detection_and_bad_roots(tmp_path):
    isles_session(tmp_path / "isles", "sub-01", "ses-1")
    assert detect_layout(tmp_path / "isles") == "isles22"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="cannot tell the dataset layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(InputFileError, match="nowhere: dataset folder does not exist"):
        discover(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown layout"):
        discover(tmp_path / "isles", layout="brats")
