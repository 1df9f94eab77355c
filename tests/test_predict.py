"""Batch prediction on the real ISLES'22 case: masks in the case's own space, tables, bad cases."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import case_files, make_checkpoint, mask_file
from typer.testing import CliRunner

from stroke_ray.predict import lesion_stats, predict_dataset


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def mixed_dataset(isles_sample, tmp_path_factory) -> Path:
    """The real case plus a copy whose DWI is a truncated .nii.gz."""
    root = tmp_path_factory.mktemp("mixed")
    good, bad = "sub-strokecase0009", "sub-strokecase0100"
    for part in ("rawdata", "derivatives"):
        shutil.copytree(isles_sample / part / good, root / part / good)
    for modality, src in case_files(isles_sample).items():
        dst = case_files(root, bad)[modality]
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        dst.write_bytes(data[: len(data) // 3] if modality == "dwi" else data)
    return root


@pytest.fixture(scope="module")
def mixed_run(mixed_dataset, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "out"
    return predict_dataset(mixed_dataset, str(checkpoint), out, progress=False), out


def test_mask_is_written_on_the_reference_grid(mixed_run, isles_sample):
    report, out = mixed_run
    dwi = nib.load(case_files(isles_sample)["dwi"])
    mask = nib.load(out / "sub-strokecase0009_mask.nii.gz")
    assert mask.shape == (112, 112, 73) == dwi.shape
    assert np.allclose(mask.affine, dwi.affine)
    assert mask.get_data_dtype() == np.uint8
    assert mask.header.get_qform(coded=True)[1] == dwi.header.get_qform(coded=True)[1]
    assert mask.header.get_sform(coded=True)[1] == dwi.header.get_sform(coded=True)[1]
    assert np.allclose(mask.header.get_zooms(), dwi.header.get_zooms())
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}


def test_tables_hold_volume_count_and_metrics(mixed_run):
    report, out = mixed_run
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["subject"] for r in rows] == ["sub-strokecase0009"]
    row = rows[0]
    mask = nib.load(out / row["mask_file"])
    expected = lesion_stats(np.asanyarray(mask.dataobj), mask.affine)
    assert float(row["volume_ml"]) == pytest.approx(expected["volume_ml"])
    assert int(row["lesion_count"]) == expected["lesion_count"]
    # The ground truth is the known 523 voxels of 8 mm^3.
    assert float(row["truth_volume_ml"]) == pytest.approx(4.184, abs=0.01)
    for key in ("dice", "abs_volume_diff_ml", "abs_lesion_count_diff", "lesion_f1"):
        assert row[key] != "" and np.isfinite(float(row[key]))
    assert float(row["abs_volume_diff_ml"]) == pytest.approx(abs(expected["volume_ml"] - 4.184), abs=0.02)
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["cases"][0]["subject"] == "sub-strokecase0009"
    assert doc["model_version"].startswith("sha256:")


def test_truncated_case_is_reported_and_skipped(mixed_run):
    report, out = mixed_run
    assert report.predicted == 1
    assert [p.subject for p in report.failed] == ["sub-strokecase0100"]
    assert report.failed[0].path.endswith("sub-strokecase0100_ses-0001_dwi.nii.gz")
    assert not (out / "sub-strokecase0100_mask.nii.gz").exists()
    doc = json.loads((out / "predictions.json").read_text())
    assert [f["subject"] for f in doc["failed"]] == ["sub-strokecase0100"]
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions.csv", "predictions.json", "sub-strokecase0009_mask.nii.gz"]


@pytest.mark.slow
def test_subjects_keep_only_those_cases_and_name_unknown_ones(mixed_dataset, checkpoint, tmp_path):
    report = predict_dataset(mixed_dataset, str(checkpoint), tmp_path / "out", progress=False,
                             subjects=["sub-strokecase0009", "sub-strokecase0404"])
    assert [r["subject"] for r in report.rows] == ["sub-strokecase0009"]
    # The truncated case was not asked for, so it is not reported; the unknown one is.
    assert [(p.subject, p.problem) for p in report.failed] == [
        ("sub-strokecase0404", "no such subject in the dataset")]
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert [r["subject"] for r in rows] == ["sub-strokecase0009"]


@pytest.mark.slow  # a full-size prediction of the real case with probabilities: ~5 s of CPU
def test_explicit_files_with_a_known_mask_and_probability(isles_sample, tmp_path):
    # A constant logit of +20 marks every voxel: the whole field of view is "lesion".
    ckpt = make_checkpoint(tmp_path / "ckpt", level="native", patch=32, bias=20.0)
    files = case_files(isles_sample)
    # A constant output is the same under every mirroring: no test-time augmentation needed.
    report = predict_dataset(files, ckpt.parent, tmp_path / "out", save_probability=True, progress=False,
                             tta_axes=())
    assert report.predicted == 1 and not report.failed
    row = report.rows[0]
    assert row["subject"] == "sub-strokecase0009_ses-0001"
    voxel_ml = float(np.prod(nib.load(files["dwi"]).header.get_zooms()[:3])) / 1000
    assert row["volume_ml"] == pytest.approx(112 * 112 * 73 * voxel_ml, rel=1e-4)
    assert row["lesion_count"] == 1
    assert "dice" not in row  # no ground truth given
    prob = nib.load(tmp_path / "out" / "sub-strokecase0009_ses-0001_prob.nii.gz")
    assert prob.shape == (112, 112, 73) and prob.get_data_dtype() == np.float32
    assert float(np.asanyarray(prob.dataobj).min()) > 0.99


@pytest.mark.slow
def test_cli_single_case_and_all_failed_exit(isles_sample, checkpoint, tmp_path):
    from stroke_ray.cli import app

    files = case_files(isles_sample)
    runner = CliRunner()
    ok = runner.invoke(app, ["predict", "--dwi", str(files["dwi"]), "--adc", str(files["adc"]),
                             "--flair", str(files["flair"]), "--mask", str(mask_file(isles_sample)),
                             "-o", str(tmp_path / "ok"), "-m", str(checkpoint)])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "ok" / "sub-strokecase0009_ses-0001_mask.nii.gz").is_file()
    row = next(csv.DictReader((tmp_path / "ok" / "predictions.csv").open()))
    assert row["dice"] != ""

    # The only case lacks FLAIR (the model needs it): reported, nothing written, exit 1.
    bad = runner.invoke(app, ["predict", "--dwi", str(files["dwi"]), "--adc", str(files["adc"]),
                              "-o", str(tmp_path / "bad"), "-m", str(checkpoint)])
    assert bad.exit_code == 1, bad.output
    assert "flair" in bad.output
    assert not list((tmp_path / "bad").glob("*.nii.gz"))


def test_cli_bad_model_is_one_line(tmp_path, isles_sample):
    from stroke_ray.cli import app

    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(gzip.compress(b"not a checkpoint"))
    result = CliRunner().invoke(app, ["predict", "-i", str(isles_sample), "-o", str(tmp_path / "o"),
                                      "-m", str(broken)])
    assert result.exit_code == 2
    assert str(broken) in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_registered_champion_is_the_default_kind_of_reference(isles_sample, checkpoint, tmp_path, new_mlflow_uri):
    from stroke_ray import model_ref, tracking

    uri = new_mlflow_uri(tmp_path)
    client = tracking.client_for(uri)
    run_id = tracking.get_or_create_run(client, "predict-test", "trained")
    model_ref.register_champion(model_ref.log_model(client, run_id, checkpoint), tracking_uri=uri)
    report = predict_dataset(case_files(isles_sample), "models:/stroke-ray-segmenter@champion",
                             tmp_path / "out", tracking_uri=uri, progress=False)
    assert report.predicted == 1
    assert report.model_version == "stroke-ray-segmenter/v1"
    assert (tmp_path / "out" / "sub-strokecase0009_ses-0001_mask.nii.gz").is_file()


def _sums(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_folder_holding_an_input_is_refused(isles_sample, checkpoint, tmp_path):
    from stroke_ray.cli import app

    data = tmp_path / "data"
    shutil.copytree(isles_sample, data)
    (tmp_path / "link").symlink_to(data)
    files = case_files(data)
    before = _sums(tmp_path)
    runner = CliRunner()
    for out in (data, tmp_path, tmp_path / "link", files["dwi"].parent, mask_file(data).parent):
        result = runner.invoke(app, ["predict", "-i", str(data), "-o", str(out), "-m", str(checkpoint)])
        assert result.exit_code == 2, (out, result.output)
        assert f"error: {out}: output folder holds the input" in result.output
    # One case given as files: the folder of its FLAIR is refused as well.
    result = runner.invoke(app, ["predict", "--dwi", str(files["dwi"]), "--adc", str(files["adc"]),
                                 "--flair", str(files["flair"]), "-o", str(files["flair"].parent),
                                 "-m", str(checkpoint)])
    assert result.exit_code == 2 and "output folder holds the input" in result.output
    assert _sums(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.slow
def test_earlier_results_are_kept_unless_overwrite(isles_sample, checkpoint, tmp_path):
    from stroke_ray.cli import app

    out = tmp_path / "out"
    args = ["predict", "-i", str(isles_sample), "-o", str(out), "-m", str(checkpoint)]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    first = _sums(out)
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert (f"error: {out}: already holds results of an earlier run (predictions.csv, predictions.json, "
            "sub-strokecase0009_mask.nii.gz); pass --overwrite") in again.output
    assert _sums(out) == first
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert sorted(_sums(out)) == sorted(first)


def test_tta_and_postprocessing_settings(checkpoint, isles_sample, tmp_path):
    from stroke_ray.cli import app
    from stroke_ray.errors import ConfigError
    from stroke_ray.segmenter import Segmenter
    from stroke_ray.service import start_server

    assert Segmenter.load(checkpoint, device="cpu").mirror_axes == (0, 1, 2)  # nnU-Net's default
    chosen = Segmenter.load(checkpoint, device="cpu", tta_axes=[2, 0], threshold=0.3, min_lesion_ml=0.2)
    assert chosen.mirror_axes == (0, 2)
    assert chosen.postprocessing.to_dict() == {"min_lesion_ml": 0.2, "threshold": 0.3}
    assert Segmenter.load(checkpoint, device="cpu", tta_axes=()).mirror_axes == ()
    for bad in ({"tta_axes": [3]}, {"tta_axes": [1, 1]}, {"min_lesion_ml": -1.0}):
        with pytest.raises(ConfigError, match="prediction settings"):
            Segmenter.load(checkpoint, **bad)
    with pytest.raises(ConfigError, match="--tta-axes"):  # before Ray or Serve is touched
        start_server(checkpoint, tta_axes=(0, 5))
    files = case_files(isles_sample)
    out = CliRunner().invoke(app, ["predict", "--dwi", str(files["dwi"]), "--adc", str(files["adc"]),
                                   "--flair", str(files["flair"]), "-o", str(tmp_path / "o"),
                                   "-m", str(checkpoint), "--tta-axes", "0,x"])
    assert out.exit_code == 2 and "--tta-axes" in out.output and not (tmp_path / "o").exists()
