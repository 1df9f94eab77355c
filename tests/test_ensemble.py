"""Fold ensembles: one checkpoint file, loaded and used exactly like a single model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stroke_ray.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_ensemble,
)
from stroke_ray.config import TrainConfig
from stroke_ray.ensemble import Ensemble
from stroke_ray.errors import InputFileError
from stroke_ray.inference import sliding_window_predict
from stroke_ray.models import build_model, size_multiple
from stroke_ray.postprocess import Postprocessing

MODALITIES = ["dwi", "adc"]


def _checkpoint(directory, seed: int, out_channels: int = 1, widths=(4, 8), **cfg_overrides):
    cfg = TrainConfig.from_dict({"model": {"widths": list(widths), "out_channels": out_channels},
                                 "data": {"level": "32", "patch_size": 16}, **cfg_overrides})
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=len(MODALITIES))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        model.head.weight.mul_(50.0)
        # Centre the foreground logit on a typical input so that the masks are partial.
        probe = torch.randn(1, len(MODALITIES), 16, 16, 16, generator=torch.Generator().manual_seed(seed))
        logits = model.eval()(probe)[0]
        model.head.bias[-1] -= (logits[-1] - (logits[0] if out_channels > 1 else 0)).median()
    return save_checkpoint(directory, model=model, epoch=seed, config=cfg, modalities=MODALITIES,
                           normalization="zscore")


def _probability(loaded, image, tta_axes=()):
    return sliding_window_predict(loaded.model, image, loaded.config.data.patch_size, overlap=0.5,
                                  multiple=size_multiple(loaded.config.model), tta_axes=tta_axes)


@pytest.mark.parametrize("classes", [1, 2])
def test_ensemble_of_identical_checkpoints_equals_one_checkpoint(tmp_path, classes):
    single = _checkpoint(tmp_path / "one", seed=0, out_channels=classes)
    path = save_ensemble(tmp_path / "ens", [single, single, single])
    raw = torch.load(path, map_location="cpu", weights_only=True)  # one plain file
    assert path.name == CHECKPOINT_FILE and raw["format"] == 2 and raw["ensemble"]["members"] == 3
    one, three = load_checkpoint(single), load_checkpoint(path)
    assert isinstance(three.model, Ensemble) and three.members == 3 and one.members == 1
    assert three.config == one.config and three.modalities == MODALITIES
    image = np.random.default_rng(0).normal(0, 1, (2, 24, 16, 16)).astype(np.float32)  # two windows
    expected = _probability(one, image)
    assert 0.05 < (expected > 0.5).mean() < 0.95  # a probability map worth comparing
    np.testing.assert_allclose(_probability(three, image), expected, atol=1e-6)
    np.testing.assert_allclose(_probability(three, image, (1,)), _probability(one, image, (1,)), atol=1e-6)


def test_ensemble_averages_the_members_probabilities(tmp_path):
    a, b = _checkpoint(tmp_path / "a", seed=0), _checkpoint(tmp_path / "b", seed=1)
    post = Postprocessing(min_lesion_ml=0.05)
    ens = load_checkpoint(save_ensemble(tmp_path / "ens", [a, b], metrics={"oof_dice": 0.5}, postprocessing=post))
    image = np.random.default_rng(1).normal(0, 1, (2, 16, 16, 16)).astype(np.float32)
    pa, pb = _probability(load_checkpoint(a), image), _probability(load_checkpoint(b), image)
    assert np.abs(pa - pb).max() > 0.1
    np.testing.assert_allclose(_probability(ens, image), (pa + pb) / 2, atol=1e-6)
    assert ens.postprocessing == post and ens.metrics == {"oof_dice": 0.5} and ens.epoch == 1


def test_members_must_be_one_kind_of_model(tmp_path):
    a = _checkpoint(tmp_path / "a", seed=0)
    wider = _checkpoint(tmp_path / "w", seed=0, widths=(4, 16))
    other_level = _checkpoint(tmp_path / "l", seed=0, data={"level": "64", "patch_size": 16})
    with pytest.raises(InputFileError, match="differs from .* in model"):
        save_ensemble(tmp_path / "x", [a, wider])
    with pytest.raises(InputFileError, match="data.level"):
        save_ensemble(tmp_path / "x", [a, other_level])
    ens = save_ensemble(tmp_path / "e", [a, a])
    with pytest.raises(InputFileError, match="already an ensemble"):
        save_ensemble(tmp_path / "x", [ens, a])
    assert not (tmp_path / "x").exists()
    # A member's weights that fit no network are named with the file.
    raw = read_checkpoint(ens)
    raw["model"]["members.2.head.bias"] = torch.zeros(1)
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(InputFileError, match="belongs to no member"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.slow  # two predictions of the real case and an MLflow registry
def test_ensemble_predicts_and_registers_like_a_single_model(tmp_path, isles_sample, new_mlflow_uri):
    from stroke_ray import model_ref, tracking
    from stroke_ray.predict import predict_dataset

    one = _checkpoint(tmp_path / "one", seed=0, val_overlap=0.0)
    ens = save_ensemble(tmp_path / "ens", [one, one])
    uri = new_mlflow_uri(tmp_path / "mlflow")
    client = tracking.client_for(uri)
    run = tracking.get_or_create_run(client, "ensembles", "cv")
    version = model_ref.register_champion(model_ref.log_model(client, run, ens), client=client)
    rows = []
    for ref in (str(one), "models:/stroke-ray-segmenter@champion"):
        report = predict_dataset(isles_sample, ref, tmp_path / f"out{len(rows)}", tracking_uri=uri,
                                 tta_axes=(), progress=False)
        assert report.predicted == 1 and not report.failed
        rows.append(report.rows[0])
    assert report.model_version == f"stroke-ray-segmenter/v{version}"
    assert rows[0]["volume_ml"] == rows[1]["volume_ml"] and rows[0]["dice"] == rows[1]["dice"]


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_an_ensemble_exports_like_a_single_model(tmp_path, fmt):
    from stroke_ray.export import ProbabilityModel, export_model

    a, b = _checkpoint(tmp_path / "a", seed=0), _checkpoint(tmp_path / "b", seed=1)
    ens = save_ensemble(tmp_path / "ens", [a, b])
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    export_model(str(ens), out, fmt=fmt)
    patch = torch.randn(2, len(MODALITIES), 16, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ProbabilityModel(load_checkpoint(ens).model).eval()(patch).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": patch.numpy()})[0]
    else:
        with torch.no_grad():
            got = torch.jit.load(str(out))(patch).numpy()
    assert got.shape == (2, 1, 16, 16, 32) and expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=1e-5)
