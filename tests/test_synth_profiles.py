"""Synthetic profiles (train vs shifted held-out cases) and the real-scan DWI artefacts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from stroke_ray.cli import app
from stroke_ray.datasets import discover
from stroke_ray.errors import StrokeRayError
from stroke_ray.metrics import label_lesions
from stroke_ray.synth import (
    PROFILES,
    Artefacts,
    SynthSettings,
    generate_dataset,
    synth_case,
    without_artefacts,
)
from stroke_ray.synth.cases import isles_grids

NO_ARTEFACTS = without_artefacts(PROFILES["train"])


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


@pytest.fixture(scope="module")
def shifted_cases():
    """Shifted cases 0-2 (territorial, embolic cluster, medium), seed 0."""
    return [synth_case(i, seed=0, settings="shifted") for i in range(3)]


def test_shifted_profile_differs_from_training(shifted_cases):
    train = [synth_case(i, seed=0) for i in range(2)]
    for case in train:
        dwi_affine = case.images["dwi"][1]
        assert "".join(nib.aff2axcodes(dwi_affine)) == "LAS"
        assert np.all((_spacing(dwi_affine) > 1.8) & (_spacing(dwi_affine) < 2.3))
    codes, slices = set(), []
    for case in shifted_cases:
        dwi, affine = case.images["dwi"]
        codes.add("".join(nib.aff2axcodes(affine)))
        spacing = _spacing(affine)
        slices.append(spacing.max())
        # Another scanner: 1.5 T coarse in-plane or 3 T fine in-plane, thick slices either way.
        assert spacing.max() >= 3.0 and (spacing.min() > 2.4 or spacing.min() < 1.7), spacing
        flair_spacing = _spacing(case.images["flair"][1])
        assert flair_spacing.max() >= 5.5 and flair_spacing.min() < 1.1  # FLAIR on its own grid
        assert case.info["profile"] == "shifted" and case.info["noise_scale"] > 1.2
        assert 1.3 <= case.info["lesion_factor"]["dwi"] <= 2.0
        assert case.info["artefacts"] is not None  # always, on held-out cases
    assert "LAS" not in codes and len(codes) >= 2, codes
    # Same seed and index, other profile: another case, not a re-render of a training one.
    assert shifted_cases[0].images["dwi"][0].shape != train[0].images["dwi"][0].shape


def test_shifted_cases_are_deterministic_by_seed(shifted_cases):
    again = synth_case(1, seed=0, settings="shifted")
    reference = shifted_cases[1]
    for modality, (image, affine) in reference.images.items():
        assert np.array_equal(image, again.images[modality][0]) and np.array_equal(affine, again.images[modality][1])
    assert np.array_equal(reference.mask, again.mask)
    other = synth_case(1, seed=1, settings="shifted")
    assert other.mask.shape != reference.mask.shape or not np.array_equal(other.mask, reference.mask)


def test_orientation_codes_are_honoured():
    for code in ("LAS", "RAS", "LPS", "RPI", "ALS", "PRS"):
        grids = isles_grids(np.random.default_rng(0), np.zeros(3), orientation=code, tilt_deg=(0.0, 0.0, 0.0))
        assert "".join(nib.aff2axcodes(grids["dwi"].affine)) == code
        assert "".join(nib.aff2axcodes(grids["flair"].affine)) == code
        # The slice axis (S/I letter) keeps the slice spacing whatever the axis order.
        slice_axis = code.index("S") if "S" in code else code.index("I")
        assert _spacing(grids["flair"].affine)[slice_axis] == pytest.approx(5.0)


def test_lesion_size_bins_are_populated(shifted_cases):
    """The accuracy benchmark scores lesions < 1 ml, 1-10 ml and > 10 ml separately."""
    bins = {"<1": 0, "1-10": 0, ">10": 0}
    for case in shifted_cases:
        labels, n = label_lesions(case.mask > 0)
        voxel_ml = abs(np.linalg.det(case.mask_affine[:3, :3])) / 1000.0
        for size in np.bincount(labels.ravel())[1:] * voxel_ml:
            bins["<1" if size < 1.0 else "1-10" if size <= 10.0 else ">10"] += 1
    assert bins["<1"] >= 5 and bins["1-10"] >= 1 and bins[">10"] >= 1, bins
    # The embolic case is a cluster of several separate small lesions.
    assert label_lesions(shifted_cases[1].mask > 0)[1] >= 3


def test_artefacts_raise_dwi_not_adc_and_leave_the_mask():
    index = 1  # a case the default probability gives artefacts to (checked below)
    with_ = synth_case(index, seed=0)
    without = synth_case(index, seed=0, settings=NO_ARTEFACTS)
    assert with_.info["artefacts"] is not None and without.info["artefacts"] is None
    # Everything else is drawn from the same stream: same lesions, same mask, same FLAIR.
    assert np.array_equal(with_.mask, without.mask)
    assert np.array_equal(with_.images["flair"][0], without.images["flair"][0])
    dwi, dwi0 = with_.images["dwi"][0], without.images["dwi"][0]
    adc, adc0 = with_.images["adc"][0], without.images["adc"][0]
    brain = dwi0 > 0
    ratio = np.where(brain, dwi / np.maximum(dwi0, 1e-6), 1.0)
    region = brain & (ratio > 1.3)
    assert region.sum() > 200, "no artefact region"
    assert not (with_.mask > 0)[region].any() or (with_.mask > 0)[region].mean() < 0.05
    # ADC is a computed map with additive noise: a gain >= 1 can only raise it.
    assert np.all(adc[brain] >= adc0[brain] - 1e-6)
    # Bright on DWI but not dark on ADC there: the cue that tells them from infarcts.
    assert np.median(dwi[region]) > 1.4 * np.median(dwi0[brain])
    # Hot spots give the real scans' bright tail: lesion-sized blobs above 2.5 x the median
    # outside any lesion, which the plain case never has.
    outside = brain & (with_.mask == 0)
    assert with_.info["artefacts"]["spots"] >= 3
    assert (dwi[outside] > 2.5 * np.median(dwi[brain])).sum() >= 10
    assert (dwi0[outside] > 2.5 * np.median(dwi0[brain])).sum() == 0
    assert np.median(adc[region]) > 0.9 * np.median(adc0[brain])
    lesion = with_.mask > 0
    assert np.median(adc[lesion]) < 0.8 * np.median(adc0[brain])


@pytest.mark.slow
def test_artefact_probability_applies_per_case():
    flags = [synth_case(i, seed=3, settings="train").info["artefacts"] is not None for i in range(3)]
    assert any(flags)
    never = SynthSettings(artefacts=Artefacts(probability=0.0))
    assert synth_case(0, seed=3, settings=never).info["artefacts"] is None


def test_settings_are_validated():
    with pytest.raises(ValidationError):
        SynthSettings(orientations=("LAX",))
    with pytest.raises(ValidationError):
        SynthSettings(orientations=("LLS",))
    with pytest.raises(ValidationError):
        SynthSettings(embolic_radius_mm=(5.0, 2.0))
    with pytest.raises(ValidationError):
        SynthSettings(lesion_classes=("haemorrhage",))
    with pytest.raises(ValidationError):
        SynthSettings(artefacts=Artefacts(probability=1.5))
    with pytest.raises(StrokeRayError, match="unknown synthetic profile"):
        synth_case(0, settings="nope")


def test_shifted_dataset_from_the_cli(tmp_path):
    out = tmp_path / "heldout"
    result = CliRunner().invoke(app, ["synth", "-o", str(out), "-n", "1", "--profile", "shifted", "--seed", "2"])
    assert result.exit_code == 0, result.output
    cases, problems = discover(out)
    assert problems == [] and len(cases) == 1
    sub = cases[0].subject
    sidecar = json.loads((out / "rawdata" / sub / "ses-0001" / f"{sub}_ses-0001_dwi.json").read_text())
    assert sidecar["SyntheticLesion"]["profile"] == "shifted"
    assert sidecar["MagneticFieldStrength"] in (1.5, 3.0)
    assert "profile=shifted" in (out / "dataset_description.json").read_text()

    bad = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "x"), "--profile", "nope"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == ["error: unknown synthetic profile 'nope'; expected one of train, shifted"]


def test_generate_dataset_takes_settings(tmp_path):
    subjects = generate_dataset(tmp_path / "d", num_cases=1, seed=0, progress=False, profile=NO_ARTEFACTS)
    sub = subjects[0]
    sidecar = json.loads((tmp_path / "d" / "rawdata" / sub / "ses-0001" / f"{sub}_ses-0001_dwi.json").read_text())
    assert sidecar["SyntheticLesion"]["artefacts"] is None
    result = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "e"), "-n", "1", "--no-artefacts"])
    assert result.exit_code == 0, result.output
    again = tmp_path / "e" / "rawdata" / sub / "ses-0001" / f"{sub}_ses-0001_dwi.nii.gz"
    assert again.read_bytes() == (tmp_path / "d" / "rawdata" / sub / "ses-0001" / again.name).read_bytes()
