"""Model references on a real sqlite MLflow store: parse, log, register, resolve, label."""

from __future__ import annotations

import pytest
import torch

from stroke_ray import checkpoint, model_ref, tracking
from stroke_ray.checkpoint import load_checkpoint, save_checkpoint
from stroke_ray.config import TrainConfig
from stroke_ray.errors import StrokeRayError
from stroke_ray.models import build_model


@pytest.fixture(scope="module")
def client(tmp_path_factory, new_mlflow_uri):
    return tracking.client_for(new_mlflow_uri(tmp_path_factory.mktemp("mlflow")))


def test_one_champion_constant():
    assert model_ref.CHAMPION_URI == "models:/stroke-ray-segmenter@champion"
    assert model_ref.CHECKPOINT_FILE == checkpoint.CHECKPOINT_FILE


@pytest.mark.parametrize("text,kind,fields", [
    ("models:/stroke-ray-segmenter@champion", "alias", {"name": "stroke-ray-segmenter", "alias": "champion"}),
    ("models:/seg/12", "version", {"name": "seg", "version": "12"}),
    ("runs:/abc123/model", "run", {"run_id": "abc123", "artifact_path": "model"}),
    ("runs:/abc123", "run", {"run_id": "abc123", "artifact_path": ""}),
    ("/data/best/checkpoint.pt", "path", {}),
])
def test_parse_tells_the_forms_apart(text, kind, fields):
    ref = model_ref.parse(text)
    assert ref.kind == kind and ref.text == text
    assert all(getattr(ref, k) == v for k, v in fields.items())


def test_written_references_are_what_parse_reads():
    version = model_ref.parse(model_ref.version_uri(3))
    assert version.text == "models:/stroke-ray-segmenter/3"
    assert (version.kind, version.name, version.version) == ("version", model_ref.REGISTERED_MODEL, "3")
    assert model_ref.version_uri("2", name="seg") == "models:/seg/2"
    run = model_ref.parse(model_ref.run_model_uri("abc123"))
    assert (run.kind, run.run_id, run.artifact_path) == ("run", "abc123", model_ref.MODEL_ARTIFACT)


def test_parse_refuses_a_malformed_registry_reference():
    with pytest.raises(StrokeRayError, match="not a model reference"):
        model_ref.parse("models:/a/b/c")


def _checkpoint(directory):
    cfg = TrainConfig.from_dict({"model": {"widths": [4, 8, 16]}})
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1)
    return save_checkpoint(directory, model=model, epoch=1, config=cfg, modalities=["t1w"], normalization="zscore"), model


def test_model_logging_registry_and_resolution(client, tmp_path):
    uri = client.tracking_uri
    ckpt, model = _checkpoint(tmp_path / "ckpt")
    run = tracking.get_or_create_run(client, "exp-train", "train")
    model_uri = model_ref.log_model(client, run, ckpt)
    assert model_uri == f"runs:/{run}/model"

    version = model_ref.register_champion(model_uri, tags={"val_dice": 0.7}, tracking_uri=uri)
    assert version == "1"
    mv = client.get_model_version_by_alias(model_ref.REGISTERED_MODEL, model_ref.CHAMPION_ALIAS)
    assert str(mv.version) == "1" and mv.tags["val_dice"] == "0.7" and mv.run_id == run

    x = torch.randn(1, 1, 8, 8, 8)
    model.eval()
    expected = model(x)
    refs = [
        str(ckpt),
        str(ckpt.parent),
        f"runs:/{run}/model",
        f"runs:/{run}/model/checkpoint.pt",
        f"models:/{model_ref.REGISTERED_MODEL}@{model_ref.CHAMPION_ALIAS}",
        f"models:/{model_ref.REGISTERED_MODEL}/1",
    ]
    for i, ref in enumerate(refs):
        local = model_ref.resolve_checkpoint(ref, tracking_uri=uri, dst=tmp_path / f"dl{i}")
        assert local.name == "checkpoint.pt", ref
        with torch.no_grad():
            assert torch.equal(load_checkpoint(local).model(x), expected), ref

    # A second registration moves the alias; registering a version of the same model reuses it.
    second = model_ref.log_model(client, run, ckpt, registered_name=model_ref.REGISTERED_MODEL)
    assert second == f"models:/{model_ref.REGISTERED_MODEL}/2"
    assert model_ref.register_champion(second, tracking_uri=uri) == "2"
    assert str(client.get_model_version_by_alias(model_ref.REGISTERED_MODEL, "champion").version) == "2"


def test_bad_references_give_one_clear_error(client, tmp_path):
    uri = client.tracking_uri
    with pytest.raises(StrokeRayError, match="no such checkpoint file"):
        model_ref.resolve_checkpoint(str(tmp_path / "missing.pt"), tracking_uri=uri)
    with pytest.raises(StrokeRayError, match="models:/nobody@champion: cannot resolve"):
        model_ref.resolve_checkpoint("models:/nobody@champion", tracking_uri=uri)
    run = tracking.get_or_create_run(client, "exp-empty", "empty")
    client.log_text(run, "not a model", "model/README.txt")
    with pytest.raises(StrokeRayError, match="holds no checkpoint.pt"):
        model_ref.resolve_checkpoint(f"runs:/{run}/model", tracking_uri=uri, dst=tmp_path / "dl")


def test_version_label_names_registry_versions_and_hashes_files(client, tmp_path):
    ckpt, _ = _checkpoint(tmp_path / "ckpt")
    assert model_ref.version_label("models:/seg/4", ckpt) == "seg/v4"
    label = model_ref.version_label(str(ckpt), ckpt)
    assert label.startswith("sha256:") and label == model_ref.version_label(str(ckpt.parent), ckpt.parent)


def test_an_alias_is_pinned_to_one_version_for_download_and_label(client, tmp_path):
    """The weights fetched for models:/name@alias and the version named are the same, even
    when the alias moves between the lookup and the download."""
    from stroke_ray.segmenter import Segmenter

    uri, name = client.tracking_uri, "pin-test"
    run = tracking.get_or_create_run(client, "exp-pin", "pin")
    x = torch.randn(1, 1, 8, 8, 8)
    outputs = {}
    for seed in (1, 2):
        cfg = TrainConfig.from_dict({"model": {"widths": [4, 8, 16]}})
        torch.manual_seed(seed)
        model = build_model(cfg.model, in_channels=1).eval()
        ckpt = save_checkpoint(tmp_path / f"ckpt{seed}", model=model, epoch=1, config=cfg, modalities=["t1w"],
                               normalization="zscore")
        uri_of_version = model_ref.log_model(client, run, ckpt, registered_name=name, artifact_path=f"model{seed}")
        with torch.no_grad():
            outputs[uri_of_version.rsplit("/", 1)[1]] = model(x)
    assert sorted(outputs) == ["1", "2"]
    alias = f"models:/{name}@current"
    model_ref.register_champion(f"models:/{name}/1", name=name, alias="current", tracking_uri=uri)

    pinned = model_ref.pin_version(alias, uri)
    assert pinned == f"models:/{name}/1"
    model_ref.register_champion(f"models:/{name}/2", name=name, alias="current", tracking_uri=uri)  # moves now
    local = model_ref.resolve_checkpoint(pinned, tracking_uri=uri, dst=tmp_path / "pinned")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(local).model(x), outputs["1"])
    assert model_ref.version_label(pinned, local, uri) == f"{name}/v1"

    # what predict, serve and export load: the label names the version whose weights they hold
    segmenter = Segmenter.load(alias, tracking_uri=uri, device="cpu")
    assert segmenter.version == f"{name}/v2" and segmenter.model_ref == alias
    with torch.no_grad():
        assert torch.equal(segmenter.loaded.model(x), outputs["2"])

    for other in (f"models:/{name}/1", f"runs:/{run}/model1", str(tmp_path / "ckpt1")):
        assert model_ref.pin_version(other, uri) == other
    with pytest.raises(StrokeRayError, match="models:/nobody@current: cannot resolve"):
        model_ref.pin_version("models:/nobody@current", uri)
