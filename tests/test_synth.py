"""Synthetic ISLES'22 / ATLAS cases: layout, grids, contrasts, lesion sizes, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from stroke_ray.cli import app
from stroke_ray.datasets import discover
from stroke_ray.errors import InputFileError, StrokeRayError
from stroke_ray.synth import ATLAS_SPACE, SYNTH_MARKER, generate_dataset, mni_anatomy

SUBJECTS = [f"sub-synth{k:04d}" for k in range(1, 5)]


def _isles_files(root: Path, sub: str) -> dict[str, Path]:
    raw = root / "rawdata" / sub / "ses-0001"
    files = {m: raw / f"{sub}_ses-0001_{m}.nii.gz" for m in ("dwi", "adc", "flair")}
    files["msk"] = root / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz"
    return files


def _case(root: Path, sub: str) -> dict[str, nib.Nifti1Image]:
    return {k: nib.load(p) for k, p in _isles_files(root, sub).items()}


def test_isles_layout_matches_the_real_release(synth_dataset):
    root = Path(synth_dataset)
    for sub in SUBJECTS:
        for modality, path in _isles_files(root, sub).items():
            assert path.is_file(), path
            if modality != "msk":
                sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
                assert sidecar["Synthetic"] is True
    assert "synthetic" in (root / "README.md").read_text().lower()
    assert json.loads((root / "dataset_description.json").read_text())["Synthetic"] is True
    assert not list(root.rglob("*.part")), "temporary files left behind"

    cases, problems = discover(root)
    assert problems == []
    assert [c.subject for c in cases] == SUBJECTS
    assert all(c.layout == "isles22" and list(c.images) == ["dwi", "adc", "flair"] for c in cases)


def test_isles_grids_like_the_real_release(synth_dataset):
    shapes = set()
    for sub in SUBJECTS:
        img = _case(Path(synth_dataset), sub)
        dwi, adc, flair, msk = img["dwi"], img["adc"], img["flair"], img["msk"]
        assert dwi.shape == adc.shape == msk.shape
        assert np.allclose(dwi.affine, adc.affine) and np.allclose(dwi.affine, msk.affine)
        assert flair.shape != dwi.shape and not np.allclose(flair.affine[:3], dwi.affine[:3])
        for im in img.values():
            assert nib.aff2axcodes(im.affine) == ("L", "A", "S")
            assert im.affine[0, 0] < 0
        dwi_mm, flair_mm = dwi.header.get_zooms(), flair.header.get_zooms()
        assert all(1.8 < z < 2.3 for z in dwi_mm), dwi_mm
        assert flair_mm[0] < 1.0 and flair_mm[1] < 1.0 and flair_mm[2] == pytest.approx(5.0)
        assert 96 <= dwi.shape[0] <= 128 and 60 <= dwi.shape[2] <= 80
        # A 2 mm field of view must hold the whole (skull-stripped, non-zero) brain.
        d = dwi.get_fdata()
        assert not d[0].any() and not d[-1].any() and not d[:, 0].any() and not d[:, -1].any()
        assert msk.get_data_dtype() == np.uint16
        mask = np.asarray(msk.dataobj)
        assert set(np.unique(mask)) == {0, 1}
        shapes.add(dwi.shape)
    assert len(shapes) > 1, "every case got the same grid"


def test_intensity_scales_match_the_real_sample(synth_dataset, isles_sample):
    real = _case(isles_sample, "sub-strokecase0009")
    synth = _case(Path(synth_dataset), SUBJECTS[1])
    for modality in ("dwi", "adc", "flair"):
        r = real[modality].get_fdata()
        s = synth[modality].get_fdata()
        assert synth[modality].get_data_dtype() == np.float32 and np.isfinite(s).all()
        ratio = np.median(s[s > 0]) / np.median(r[r > 0])
        assert 0.7 < ratio < 1.4, (modality, ratio)
    adc = synth["adc"].get_fdata()
    # Free water (ventricles) is ~3e-3 mm^2/s, parenchyma below 1e-3.
    assert np.percentile(adc[adc > 0], 99) > 2.0 and np.percentile(adc[adc > 0], 25) < 1.0
    brain_ml = (synth["dwi"].get_fdata() > 0).sum() * np.prod(synth["dwi"].header.get_zooms()) / 1000
    assert 1100 < brain_ml < 2000


def test_lesion_contrast_signs_and_inside_brain(synth_dataset):
    for sub in SUBJECTS:
        img = _case(Path(synth_dataset), sub)
        mask = np.asarray(img["msk"].dataobj) > 0
        dwi, adc = img["dwi"].get_fdata(), img["adc"].get_fdata()
        brain = dwi > 0
        assert mask.any() and brain[mask].all(), sub
        outside = brain & ~mask
        assert dwi[mask].mean() > 1.2 * dwi[outside].mean(), sub
        assert adc[mask].mean() < 0.85 * np.median(adc[outside]), sub


def test_lesion_volumes_range_from_dots_to_territories(synth_dataset):
    volumes = []
    for sub in SUBJECTS:
        msk = nib.load(_isles_files(Path(synth_dataset), sub)["msk"])
        volumes.append(np.asarray(msk.dataobj).sum() * np.prod(msk.header.get_zooms()) / 1000.0)
    assert min(volumes) < 1.0, volumes  # embolic dots / lacunes
    assert max(volumes) > 15.0, volumes  # a territorial infarct


def test_same_seed_same_bytes_whatever_the_count(synth_dataset, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    reference = _isles_files(Path(synth_dataset), SUBJECTS[0])
    # A file half-written by an earlier, interrupted run (which left its marker first) is replaced.
    broken = _isles_files(again, SUBJECTS[0])["dwi"]
    broken.parent.mkdir(parents=True)
    (again / SYNTH_MARKER).write_text("{}")
    broken.write_bytes(reference["dwi"].read_bytes()[:1000])

    assert generate_dataset(again, num_cases=1, seed=0, progress=False) == [SUBJECTS[0]]
    for key, path in _isles_files(again, SUBJECTS[0]).items():
        assert path.read_bytes() == reference[key].read_bytes(), key

    generate_dataset(other, num_cases=1, seed=1, progress=False)
    new = _case(other, SUBJECTS[0])
    old = _case(Path(synth_dataset), SUBJECTS[0])
    assert new["dwi"].shape != old["dwi"].shape or not np.array_equal(new["dwi"].get_fdata(), old["dwi"].get_fdata())
    assert np.asarray(new["msk"].dataobj).sum() != np.asarray(old["msk"].dataobj).sum()


@pytest.mark.slow
def test_atlas_case_from_the_cli(atlas_dataset):
    out = atlas_dataset  # `stroke-ray synth -o ... -n 1 --layout atlas --seed 3`, exit code checked

    sub = "sub-synth0001"
    anat = out / sub / "ses-1" / "anat"
    t1 = nib.load(anat / f"{sub}_ses-1_{ATLAS_SPACE}_T1w.nii.gz")
    msk = nib.load(anat / f"{sub}_ses-1_{ATLAS_SPACE}_label-L_desc-T1lesion_mask.nii.gz")
    # The ATLAS R2.0 / MNI152NLin2009aSym 1 mm grid.
    mni = np.array([[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=float)
    assert t1.shape == msk.shape == (197, 233, 189)
    assert np.allclose(t1.affine, mni) and np.allclose(msk.affine, mni)
    mask = np.asarray(msk.dataobj)
    assert msk.get_data_dtype() == np.uint8 and set(np.unique(mask)) == {0, 1}

    image = t1.get_fdata(dtype=np.float32)
    lesion = mask > 0
    gm, wm, csf = (t > 0.9 for t in mni_anatomy().on_template())
    clean = ~lesion
    # T1w: WM brighter than GM brighter than CSF; chronic lesions dark.
    assert image[wm & clean].mean() > image[gm & clean].mean() > image[csf & clean].mean()
    assert image[lesion].mean() < 0.8 * image[(gm | wm) & clean].mean()

    cases, problems = discover(out)
    assert problems == [] and [c.subject for c in cases] == [sub] and cases[0].layout == "atlas"


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(StrokeRayError, match="layout"):
        generate_dataset(tmp_path / "x", num_cases=1, layout="brats", progress=False)
    with pytest.raises(StrokeRayError, match="num_cases"):
        generate_dataset(tmp_path / "x", num_cases=0, progress=False)
    afile = tmp_path / "file"
    afile.write_text("keep me")
    with pytest.raises(InputFileError, match="not a directory"):
        generate_dataset(afile, num_cases=1, progress=False)
    assert afile.read_text() == "keep me"

    result = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "y"), "--layout", "brats"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: unknown layout 'brats'; expected one of isles22, atlas"]


def test_synth_never_writes_into_a_folder_it_did_not_make(isles_sample, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(isles_sample, real)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in real.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["synth", "-o", str(real), "-n", "1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {real}: folder is not empty and was not made by stroke-ray synth (no {SYNTH_MARKER}); "
        "choose a new or empty folder"]
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in real.rglob("*") if p.is_file()}
    assert after == before
    # An empty folder is fine, and synthetic ids never look like a real dataset's.
    (tmp_path / "empty").mkdir()
    assert generate_dataset(tmp_path / "empty", num_cases=1, progress=False) == ["sub-synth0001"]
    assert (tmp_path / "empty" / SYNTH_MARKER).is_file()
