"""Every dataset layout converts: the ISLES-2022 archive as released, ATLAS R2.0, nnU-Net v2 raw
datasets (and export to one), with synthetic cases re-arranged into each layout."""

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
from stroke_ray.datasets import discover, open_dataset
from stroke_ray.errors import ConfigError, InputFileError
from stroke_ray.ingest import convert_dataset, sha256_of
from stroke_ray.nnunet_export import EXPORT_MARKER, export_nnunet
from stroke_ray.store import StrokeStore

MODALITIES = ("dwi", "adc", "flair")


@pytest.fixture(scope="module")
def example(synth_dataset) -> Path:
    """The session's synthetic cases, in the repository-example layout (rawdata/, derivatives/)."""
    return synth_dataset


def example_cases(example: Path, n: int):
    cases, problems = discover(example)
    assert problems == [] and len(cases) >= n
    return cases[:n]


def to_example(example: Path, root: Path, n: int) -> Path:
    """The first `n` cases alone, in the example layout."""
    for case in example_cases(example, n):
        for part in ("rawdata", "derivatives"):
            shutil.copytree(example / part / case.subject, root / part / case.subject)
    return root


def to_archive(example: Path, root: Path, n: int = 2) -> Path:
    """The first `n` cases laid out as the released ISLES-2022 archive, JSON sidecars included."""
    for case in example_cases(example, n):
        sub = case.subject
        session = root / sub / "ses-0001"
        for modality, src in case.images.items():
            folder, name = ("anat", "FLAIR") if modality == "flair" else ("dwi", modality)
            dst = session / folder / f"{sub}_ses-0001_{name}.nii.gz"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            shutil.copy(str(src).replace(".nii.gz", ".json"), str(dst).replace(".nii.gz", ".json"))
        mask = root / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz"
        mask.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(case.mask, mask)
    (root / "dataset_description.json").write_text('{"Name": "ISLES 2022"}\n')
    return root


def to_nnunet(example: Path, root: Path, channel_names=("DWI", "adc", "Flair"), n: int = 2,
              test_cases: int = 1) -> Path:
    """The first `n` cases as an nnU-Net v2 raw dataset; the last `test_cases` go to imagesTs."""
    cases = example_cases(example, n)
    for k, case in enumerate(cases):
        split = "Ts" if k >= len(cases) - test_cases else "Tr"
        for channel, modality in enumerate(MODALITIES):
            dst = root / f"images{split}" / f"{case.subject}_{channel:04d}.nii.gz"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(case.images[modality], dst)
        if split == "Tr":
            (root / "labelsTr").mkdir(parents=True, exist_ok=True)
            shutil.copy(case.mask, root / "labelsTr" / f"{case.subject}.nii.gz")
    doc = {"channel_names": {str(i): n for i, n in enumerate(channel_names)},
           "labels": {"background": 0, "lesion": 1}, "numTraining": len(cases) - test_cases,
           "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def native_arrays(url: str, subject: str):
    store = StrokeStore.open(url)
    return store.image(subject)[...], store.mask(subject)[...], store.affine(subject)


def assert_read_the_example_files(url: str, cases) -> None:
    """Each stored subject was read from byte-identical copies of the example's files, each
    modality (and the mask) from its own file."""
    store = StrokeStore.open(url)
    for case in cases:
        sources = store.meta(case.subject)["sources"]
        files = {**case.images, "mask": case.mask}
        assert {k: v["sha256"] for k, v in sources.items()} == {k: sha256_of(p) for k, p in files.items()}


# --- the released ISLES-2022 archive ------------------------------------------------------------
@pytest.mark.slow
def test_archive_layout_converts_from_its_own_root_and_the_folder_above(example, tmp_path):
    top = tmp_path / "download"
    archive = to_archive(example, top / "ISLES-2022", n=2)
    good, broken = example_cases(example, 2)
    # A missing FLAIR for one subject is reported beside the good one.
    missing = next((archive / broken.subject / "ses-0001" / "anat").glob("*_FLAIR.nii.gz"))
    missing.unlink()
    for root in (archive, top):
        found = open_dataset(root)
        assert (found.layout, found.root, found.modalities) == ("isles22", archive, list(MODALITIES))
    cases, problems = discover(top)
    assert [c.subject for c in cases] == [good.subject]
    assert cases[0].images["flair"].name.endswith("_ses-0001_FLAIR.nii.gz")
    assert cases[0].images["adc"].parent.name == "dwi" and cases[0].mask.parent.parent.parent.name == "derivatives"
    assert [(p.subject, p.path, p.problem) for p in problems] == [(broken.subject, str(missing), "missing flair image")]

    out = str(tmp_path / "archive.zarr")
    result = CliRunner().invoke(app, ["convert", str(top), "-o", out, "--levels", "16", "--in-process"])
    assert result.exit_code == 1, result.output  # one subject failed, the other converted
    assert "converted 1, skipped 0 (already complete), failed 1" in result.output
    assert f"{broken.subject}: {missing}: missing flair image" in result.output
    assert StrokeStore.open(out).subjects() == [good.subject]
    assert_read_the_example_files(out, [good])
    assert StrokeStore.open(out).group.attrs["layout"] == "isles22"


# --- ATLAS R2.0 ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_atlas_dataset_converts_end_to_end(atlas_dataset, tmp_path):
    """A synthetic ATLAS R2.0 case as `stroke-ray synth --layout atlas` writes it, through `stroke-ray convert`."""
    sub = "sub-synth0001"
    t1w = next(atlas_dataset.rglob(f"{sub}_*_T1w.nii.gz"))
    mask = next(atlas_dataset.rglob(f"{sub}_*_desc-T1lesion_mask.nii.gz"))
    out = str(tmp_path / "atlas.zarr")
    result = CliRunner().invoke(app, ["convert", str(atlas_dataset), "-o", out, "--levels", "16", "--spacing", "8",
                                      "--in-process"])
    assert result.exit_code == 0, result.output
    assert "converted 1, skipped 0 (already complete), failed 0" in result.output

    store = StrokeStore.open(out)
    assert store.group.attrs["layout"] == "atlas"
    assert store.subjects() == [sub] and store.modalities == ["t1w"]
    assert store.levels == ["native", "16", "8mm"]
    # The native level is the T1w's own 1 mm MNI grid, mask voxel for voxel.
    assert store.image(sub).shape == (1, 197, 233, 189)
    np.testing.assert_allclose(store.affine(sub), nib.load(t1w).affine)
    native_mask = np.asarray(store.mask(sub)[...])
    np.testing.assert_array_equal(native_mask, np.asarray(nib.load(mask).dataobj))
    assert store.meta(sub)["lesion_voxels"] == int(native_mask.sum()) > 0
    assert store.meta(sub)["sources"]["t1w"]["sha256"] == sha256_of(t1w)
    # The training levels exist, each with the lesion in it.
    assert store.image(sub, "16").shape == (1, 16, 16, 16)
    image_8mm, mask_8mm = store.image(sub, "8mm"), np.asarray(store.mask(sub, "8mm")[...])
    assert image_8mm.shape == (1, *mask_8mm.shape) and np.allclose(np.diag(store.affine(sub, "8mm"))[:3], 8.0)
    for level in ("16", "8mm"):
        assert np.asarray(store.mask(sub, level)[...]).sum() > 0, level


# --- nnU-Net v2 raw datasets --------------------------------------------------------------------
def test_nnunet_dataset_converts_with_channel_names_mapped(example, tmp_path):
    root = to_nnunet(example, tmp_path / "nnUNet_raw" / "Dataset501_Stroke", n=2, test_cases=1)
    train_case, test_case = example_cases(example, 2)
    found = open_dataset(tmp_path / "nnUNet_raw")  # one folder up finds the one dataset
    assert (found.layout, found.root, found.modalities) == ("nnunet", root, list(MODALITIES))
    cases, problems = found.discover(["FLAIR", "dwi"])  # case-insensitive, in the order asked
    assert problems == [] and [c.subject for c in cases] == [train_case.subject]
    assert list(cases[0].images) == ["flair", "dwi"] and cases[0].images["flair"].name.endswith("_0002.nii.gz")
    # imagesTs cases have no labels: found for prediction only.
    cases, problems = found.discover(require_mask=False)
    assert [c.subject for c in cases] == [train_case.subject, test_case.subject] and cases[1].mask is None

    out = str(tmp_path / "nnunet.zarr")
    report = convert_dataset(str(root), out, levels=[16], parallel=False, progress=False)
    assert (report.converted, report.failed) == (1, [])
    store = StrokeStore.open(out)
    assert store.modalities == list(MODALITIES) and store.group.attrs["layout"] == "nnunet"
    assert_read_the_example_files(out, [train_case])


def test_nnunet_unknown_channel_names_are_kept_and_problems_listed(example, tmp_path):
    root = to_nnunet(example, tmp_path / "ds", channel_names=("DWI", "CT", "T2"), n=3, test_cases=0)
    found = open_dataset(root)
    assert found.modalities == ["dwi", "CT", "T2"]
    assert found.resolve(["ct", "t2"]) == ["CT", "T2"]
    subjects = [c.subject for c in example_cases(example, 3)]
    (root / "imagesTr" / f"{subjects[1]}_0001.nii.gz").unlink()
    (root / "labelsTr" / f"{subjects[2]}.nii.gz").unlink()
    cases, problems = found.discover()
    assert [c.subject for c in cases] == subjects[:1]
    assert sorted((p.subject, Path(p.path).name, p.problem) for p in problems) == [
        (subjects[1], f"{subjects[1]}_0001.nii.gz", "missing CT image"),
        (subjects[2], f"{subjects[2]}.nii.gz", "missing lesion mask"),
    ]
    with pytest.raises(ConfigError, match="unknown modality 'flair' for layout nnunet; known: dwi, CT, T2"):
        found.resolve(["flair"])


@pytest.mark.parametrize("doc, message", [
    ("{not json", "not a readable dataset.json"),
    ('{"labels": {"background": 0, "lesion": 1}}', "no channel_names"),
    ('{"channel_names": {"0": "DWI", "2": "ADC"}}', "channel_names keys must be 0..1"),
    ('{"channel_names": {"0": "DWI", "1": "dwi"}}', "channel names repeat"),
    ('{"channel_names": {"0": "DWI"}, "file_ending": ".mha"}', "file_ending '.mha' is not NIfTI"),
    ('{"channel_names": {"0": "DWI"}, "labels": {"background": 0, "core": 1, "penumbra": 2}}',
     "not background 0 plus one lesion label"),
    ('{"channel_names": {"0": "DWI"}, "labels": {"background": 0, "lesion": 255}}', "the lesion label is 255"),
])
def test_bad_dataset_json_is_one_line(tmp_path, doc, message):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(doc)
    with pytest.raises(InputFileError, match=message) as info:
        discover(tmp_path)
    assert info.value.path == str(tmp_path / "dataset.json")


# --- detection ----------------------------------------------------------------------------------
def test_a_folder_of_no_known_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "brain.nii.gz").write_bytes(b"")
    result = CliRunner().invoke(app, ["convert", str(tmp_path), "-o", str(tmp_path / "s.zarr"), "--in-process"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for phrase in ("cannot tell the dataset layout", "rawdata/", "sub-*/ses-*/{dwi,anat}/", "ATLAS R2.0",
                   "dataset.json beside imagesTr/", "here and one folder down"):
        assert phrase in lines[0]
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(InputFileError, match="not a nnunet dataset: looked for dataset.json"):
        discover(tmp_path, layout="nnunet")


def test_several_datasets_one_level_down_are_not_guessed(example, tmp_path):
    to_archive(example, tmp_path / "a", n=1)
    to_nnunet(example, tmp_path / "b", n=1, test_cases=0)
    with pytest.raises(InputFileError, match=r"holds several datasets \(a \(isles22\), b \(nnunet\)\)"):
        open_dataset(tmp_path)
    # One folder in two layouts at once is refused too, rather than picked arbitrarily.
    shutil.copytree(tmp_path / "b" / "imagesTr", tmp_path / "a" / "imagesTr")
    shutil.copy(tmp_path / "b" / "dataset.json", tmp_path / "a" / "dataset.json")
    with pytest.raises(InputFileError, match=r"matches several layouts \(isles22, nnunet\)"):
        open_dataset(tmp_path / "a")


# --- export-nnunet ------------------------------------------------------------------------------
def test_export_nnunet_round_trip_and_refusals(example, tmp_path):
    store_url = str(tmp_path / "s.zarr")
    convert_dataset(str(to_example(example, tmp_path / "two", 2)), store_url, levels=[16], parallel=False,
                    progress=False)
    subjects = StrokeStore.open(store_url).subjects()
    out = tmp_path / "nnUNet_raw" / "Dataset501_Stroke"
    result = CliRunner().invoke(app, ["export-nnunet", store_url, str(out)])
    assert result.exit_code == 0, result.output
    assert f"exported 2 case(s) (dwi, adc, flair) as an nnU-Net v2 raw dataset to {out}" in result.output
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "DWI", "1": "ADC", "2": "FLAIR"}
    assert doc["labels"] == {"background": 0, "lesion": 1} and doc["numTraining"] == 2
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(
        f"{s}_{c:04d}.nii.gz" for s in subjects for c in range(3))
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(f"{s}.nii.gz" for s in subjects)

    # Converting the export gives back the store's native arrays and affines.
    again = str(tmp_path / "again.zarr")
    report = convert_dataset(str(out), again, levels=[16], parallel=False, progress=False)
    assert (report.converted, report.failed) == (2, [])
    for subject in subjects:
        for got, want in zip(native_arrays(again, subject), native_arrays(store_url, subject)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    # A second export into its own folder is fine; into someone else's folder it is refused.
    assert export_nnunet(store_url, out, progress=False).subjects == subjects
    assert (out / EXPORT_MARKER).is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    before = checksums(theirs)
    result = CliRunner().invoke(app, ["export-nnunet", store_url, str(theirs)])
    assert result.exit_code == 2
    assert f"error: {theirs}: folder is not empty and was not made by export-nnunet" in result.output
    assert checksums(theirs) == before
