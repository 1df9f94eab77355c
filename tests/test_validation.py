"""Validation in the case's own space equals `stroke-ray predict` plus the metrics."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stroke_ray.checkpoint import save_checkpoint
from stroke_ray.config import TrainConfig
from stroke_ray.grid import cube_affine
from stroke_ray.metrics import METRIC_KEYS
from stroke_ray.models import build_model, size_multiple
from stroke_ray.postprocess import (
    CANDIDATES,
    MIN_LESION_ML_CANDIDATES,
    N_SCORES,
    THRESHOLD_CANDIDATES,
    Postprocessing,
)
from stroke_ray.store import NATIVE, LevelArrays, StrokeStore
from stroke_ray.validation import (
    SubjectScores,
    ValidationTotals,
    predict_subject,
    score_subject,
    store_case,
    validate,
)


def dwi_threshold_unet(cfg: TrainConfig, in_channels: int, threshold: float = 2.0, slope: float = 8.0):
    """A real U-Net whose weights make it compute slope * (z-scored DWI - threshold).

    Only the identity path through the first encoder and last decoder block is non-zero
    (BatchNorm in eval mode with unit statistics is the identity), so the network finds
    the bright synthetic lesions without training, and `predict` can rebuild it from its
    checkpoint like any trained model.
    """
    model = build_model(cfg.model, in_channels=in_channels)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in (model.down[0], model.merge[0]):
            block[0].weight[0, 0, 1, 1, 1] = 1.0
            block[3].weight[0, 0, 1, 1, 1] = 1.0
            block[1].weight.fill_(1.0)
            block[4].weight.fill_(1.0)
        model.head.weight[0, 0] = slope
        model.head.bias.fill_(-slope * threshold)
    return model.eval()


@pytest.fixture(scope="module")
def nifti_store(synth_dataset, tmp_path_factory) -> str:
    """The synthetic NIfTI cases converted in this process, with a 32^3 training level."""
    from stroke_ray.ingest import convert_dataset

    out = str(tmp_path_factory.mktemp("native") / "synth.zarr")
    report = convert_dataset(str(synth_dataset), out, levels=[32], progress=False, parallel=False)
    assert report.converted == 4, report.summary()
    return out


def _config(store: str, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"widths": [4, 8]},
        "data": {"store": store, "level": "32", "patch_size": 32},
        "val_overlap": 0.0, "batch_size": 2, **overrides,
    })


@pytest.mark.slow  # synthetic cases, a store, predict over four cases
def test_native_validation_equals_predict_plus_metrics(synth_dataset, nifti_store, tmp_path):
    from stroke_ray.cli import app

    store = StrokeStore.open(nifti_store)
    subjects = store.subjects()
    cfg = _config(nifti_store)
    model = dwi_threshold_unet(cfg, len(store.modalities))
    multiple = size_multiple(cfg.model)

    totals, example = validate(model, store, subjects, cfg, torch.device("cpu"), False, multiple)
    per_subject = {}
    for subject in subjects:
        case, prediction = predict_subject(model, store, subject, cfg, multiple=multiple)
        per_subject[subject] = score_subject(store, subject, case, prediction, "32")

    save_checkpoint(tmp_path / "model", model=model, epoch=0, config=cfg,
                    modalities=store.modalities, normalization=store.normalization)
    out = CliRunner().invoke(app, ["predict", "-i", str(synth_dataset), "-o", str(tmp_path / "pred"),
                                   "-m", str(tmp_path / "model"), "--no-tta", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = {row["subject"]: row for row in csv.DictReader(fh)}

    assert sorted(rows) == subjects
    for subject in subjects:
        for key in METRIC_KEYS:
            assert float(rows[subject][key]) == pytest.approx(per_subject[subject].native[key], abs=1e-9), (subject, key)
    # The metrics are not trivial: lesions are found, and one case's are not.
    dices = [float(rows[s]["dice"]) for s in subjects]
    assert max(dices) > 0.5 and min(dices) < max(dices)
    means = totals.metrics()
    for key in METRIC_KEYS:
        assert means[f"val_{key}"] == pytest.approx(np.mean([float(rows[s][key]) for s in subjects]), abs=1e-9)
    # The training level scores differently (lesions of a few voxels vanish on the 32^3 grid).
    assert any(per_subject[s].level != per_subject[s].native for s in subjects)
    assert set(means) >= {f"val_level_{k}" for k in METRIC_KEYS}
    assert example[0] in subjects and example[1].shape == store.image(example[0], NATIVE).shape


@pytest.mark.slow  # synthetic cases and a store
def test_store_case_is_the_case_predict_reads(synth_dataset, nifti_store):
    from stroke_ray.datasets import discover
    from stroke_ray.ingest import load_case

    store = StrokeStore.open(nifti_store)
    cases, _ = discover(synth_dataset, modalities=store.modalities, layout="auto")
    files = cases[0]
    loaded = load_case(files.images, files.mask, subject=files.subject)
    stored = store_case(store, files.subject)
    np.testing.assert_array_equal(stored.image, loaded.image)
    np.testing.assert_array_equal(stored.mask, loaded.mask)
    np.testing.assert_array_equal(stored.affine, loaded.affine)
    assert stored.attrs["norm"]["mean"] == loaded.attrs["norm"]["mean"]
    assert stored.attrs["norm"]["std"] == loaded.attrs["norm"]["std"]


@pytest.mark.slow  # synthetic cases, a store, three predictions
def test_predict_applies_the_stored_postprocessing(synth_dataset, nifti_store, tmp_path):
    from stroke_ray.predict import predict_dataset

    store = StrokeStore.open(nifti_store)
    cfg = _config(nifti_store)
    model = dwi_threshold_unet(cfg, len(store.modalities))  # finds small false blobs beside the lesions
    kwargs = {"modalities": store.modalities, "normalization": store.normalization, "epoch": 0, "config": cfg}
    save_checkpoint(tmp_path / "plain", model=model, **kwargs)
    one = {"subjects": store.subjects()[:1], "tta_axes": (), "progress": False}
    plain = predict_dataset(synth_dataset, tmp_path / "plain", tmp_path / "a", **one)
    # The stored minimum size lies between the smallest and the largest component the plain
    # prediction found, so it must remove some and keep others.
    volumes = _component_volumes_ml(tmp_path / "a" / plain.rows[0]["mask_file"])
    assert len(volumes) >= 2 and volumes[0] < volumes[-1], volumes
    min_ml = float(np.sqrt(volumes[0] * volumes[-1]))
    save_checkpoint(tmp_path / "post", model=model, postprocessing=Postprocessing(min_lesion_ml=min_ml), **kwargs)
    post = predict_dataset(synth_dataset, tmp_path / "post", tmp_path / "b", **one)
    override = predict_dataset(synth_dataset, tmp_path / "post", tmp_path / "c", min_lesion_ml=0.0, **one)
    counts = [[r["lesion_count"] for r in report.rows] for report in (plain, post, override)]
    assert counts[0] == counts[2] and 0 < sum(counts[1]) < sum(counts[0]), counts
    assert all(b <= a for a, b in zip(counts[0], counts[1]))


def _component_volumes_ml(mask_file) -> list[float]:
    """Sorted volumes (ml) of a mask file's lesions, labelled as the metrics label them."""
    import nibabel as nib

    from stroke_ray.metrics import label_lesions

    img = nib.load(mask_file)
    labels, _ = label_lesions(np.asarray(img.dataobj) > 0)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    return sorted(float(n) * voxel_ml for n in np.bincount(labels.ravel())[1:] if n)


def _cube_store(url: str, cases: dict[str, int]) -> StrokeStore:
    """Subjects whose native grid is the 32^3 level grid, each with a cube lesion of `edge`."""
    store = StrokeStore.create(url, ["dwi"], [NATIVE, "32"])
    affine = cube_affine((32, 32, 32), np.diag([-2.0, 2.0, 2.0, 1.0]), 32)
    for name, edge in cases.items():
        mask = np.zeros((32, 32, 32), np.uint8)
        mask[10:10 + edge, 10:10 + edge, 10:10 + edge] = 1
        arrays = LevelArrays(image=np.zeros((1, 32, 32, 32), np.float32), mask=mask, affine=affine)
        store.write_subject(name, {NATIVE: arrays, "32": arrays},
                            {"norm": {"mean": [0.0], "std": [1.0], "region": "brain"}})
    return StrokeStore.open(url)


def test_validation_overlay_shows_the_case_with_the_most_lesion(tmp_path):
    store = _cube_store(str(tmp_path / "val.zarr"), {"sub-empty": 0, "sub-big": 8, "sub-small": 2})
    cfg = _config(store.url, data={"store": store.url, "level": "32", "patch_size": 16})
    model = build_model(cfg.model, in_channels=1)
    with torch.no_grad():  # a model that predicts no lesion anywhere
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
    totals, example = validate(model, store, ["sub-empty", "sub-small", "sub-big"], cfg,
                               torch.device("cpu"), False, size_multiple(cfg.model))
    assert totals.count == 3 and example[0] == "sub-big" and int(example[2].sum()) == 512
    assert totals.native["dice"] == pytest.approx(1.0)  # empty vs empty is 1, the two misses are 0
    # Removal cannot help a model that predicts nothing: the smallest size is chosen.
    assert totals.postprocessing() == Postprocessing(min_lesion_ml=0.0, threshold=0.5)


def test_totals_add_up_over_workers_and_choose_the_size():
    rng = np.random.default_rng(0)
    a, b = ValidationTotals(), ValidationTotals()
    for i, totals in enumerate((a, b, b)):
        post = rng.uniform(0.0, 0.5, size=N_SCORES)
        post[THRESHOLD_CANDIDATES.index(0.3)] = 0.9  # the best Dice on every subject
        post[len(THRESHOLD_CANDIDATES) + CANDIDATES.index((0.3, MIN_LESION_ML_CANDIDATES[3]))] = 2.0
        totals.add(SubjectScores(f"s{i}", dict.fromkeys(METRIC_KEYS, 0.5), None, post))
    merged = ValidationTotals.from_vector(np.add(a.vector(), b.vector()))
    assert merged.count == 3 and merged.level_count == 0
    metrics = merged.metrics()
    assert metrics["val_dice"] == pytest.approx(0.5) and "val_level_dice" not in metrics
    assert metrics["postprocess_min_lesion_ml"] == MIN_LESION_ML_CANDIDATES[3]
    assert metrics["postprocess_threshold"] == 0.3
    assert metrics["val_postprocessed_score"] == pytest.approx(2.0)
    assert ValidationTotals().postprocessing() == Postprocessing()
