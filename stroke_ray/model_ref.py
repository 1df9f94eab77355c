"""Model references: what names a trained model, and how to get its checkpoint.

A model reference is one of

    models:/stroke-ray-segmenter@champion   a registered model by alias (`CHAMPION_URI`)
    models:/stroke-ray-segmenter/3          a registered model by version
    runs:/<run_id>/model                    a run's logged model artifact
    /path/to/checkpoint.pt or /path/to/dir  a checkpoint file, or a folder holding one

`parse` tells them apart, `run_model_uri` and `version_uri` write them, `pin_version` turns an alias into the version it points at,
`resolve_checkpoint` turns any of them into a local `checkpoint.pt` (downloading registry
and run artifacts), `version_label` names the exact weights for logs and HTTP headers, `log_model` logs a checkpoint to a run and
`register_champion` points the champion alias at a version. Every other module goes
through these functions; the champion's name is written only here.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from stroke_ray.errors import StrokeRayError
from stroke_ray.files import CHECKPOINT_FILE
from stroke_ray.tracking import client_for

__all__ = [
    "CHAMPION_ALIAS",
    "CHAMPION_URI",
    "MODEL_ARTIFACT",
    "REGISTERED_MODEL",
    "ModelRef",
    "log_model",
    "parse",
    "pin_version",
    "register_champion",
    "register_run_version",
    "resolve_checkpoint",
    "run_model_uri",
    "version_label",
    "version_uri",
]

# checkpoint.py (and with it torch) is imported inside the functions that read files, so
# that the CLI can name CHAMPION_URI in its option defaults without loading torch.
REGISTERED_MODEL = "stroke-ray-segmenter"
CHAMPION_ALIAS = "champion"
CHAMPION_URI = f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}"
# A run's model lives under this artifact folder: runs:/<run_id>/model.
MODEL_ARTIFACT = "model"
# Where an MLflow (pyfunc) model folder keeps the checkpoint; models logged before the pyfunc
# flavour hold it as model/checkpoint.pt, and both are read.
PYFUNC_CHECKPOINT = f"artifacts/{CHECKPOINT_FILE}"

_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)/?$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/(?P<path>.*))?$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference; `kind` is "alias", "version", "run" or "path"."""

    text: str
    kind: str
    name: str | None = None  # registered model name (alias, version)
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    artifact_path: str = ""  # inside the run (run)

    @property
    def registered(self) -> bool:
        return self.kind in ("alias", "version")


def parse(ref: str | Path) -> ModelRef:
    """Tell a registry alias, a registry version, a run artifact and a local path apart.

    Raises:
        StrokeRayError: a `models:/` or `runs:/` reference that matches no known form.
    """
    text = str(ref)
    if (m := _MODELS_ALIAS.match(text)) is not None:
        return ModelRef(text, "alias", name=m["name"], alias=m["alias"])
    if (m := _MODELS_VERSION.match(text)) is not None:
        return ModelRef(text, "version", name=m["name"], version=m["version"])
    if (m := _RUNS.match(text)) is not None:
        return ModelRef(text, "run", run_id=m["run_id"], artifact_path=m["path"] or "")
    if text.startswith(("models:/", "runs:/")):
        raise StrokeRayError(f"{text}: not a model reference (use models:/name@alias, models:/name/N or runs:/id/path)")
    return ModelRef(text, "path")


def run_model_uri(run_id: str, artifact_path: str = MODEL_ARTIFACT) -> str:
    """`runs:/<run_id>/model`: the model a training run logged."""
    return f"runs:/{run_id}/{artifact_path}"


def version_uri(version: str | int, name: str = REGISTERED_MODEL) -> str:
    """`models:/<name>/<version>`: one registered version, which stays put when an alias moves."""
    return f"models:/{name}/{version}"


# --------------------------------------------------------------------------- resolving


def _download(client, source: str, dst: Path) -> Path:
    r = _RUNS.match(source)
    if r:
        return Path(client.download_artifacts(r["run_id"], r["path"] or "", str(dst)))
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=client.tracking_uri))


def _checkpoint_in(path: Path) -> Path:
    """The checkpoint of a file, a folder holding checkpoint.pt, or an MLflow model folder."""
    from stroke_ray.checkpoint import checkpoint_file

    pyfunc = path / PYFUNC_CHECKPOINT
    if path.is_dir() and not (path / CHECKPOINT_FILE).is_file() and pyfunc.is_file():
        return pyfunc
    return checkpoint_file(path)


def _run_source(client, ref: ModelRef) -> str:
    """`runs:/id/model/checkpoint.pt` of a pyfunc model is `runs:/id/model/artifacts/checkpoint.pt`.

    References written for models logged before the pyfunc flavour keep working.
    """
    path = ref.artifact_path.rstrip("/")
    if path == CHECKPOINT_FILE or path.endswith(f"/{CHECKPOINT_FILE}"):
        folder = path[: -len(CHECKPOINT_FILE)].rstrip("/")
        listed = {f.path for f in client.list_artifacts(ref.run_id, folder or None)}
        if path not in listed and f"{folder}/artifacts".lstrip("/") in listed:
            return f"runs:/{ref.run_id}/{folder}/{PYFUNC_CHECKPOINT}".replace("//", "/")
    return ref.text


def resolve_checkpoint(model_ref: str | Path, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local `checkpoint.pt` for a file/dir path, `runs:/id/path`, `models:/name@alias` or `models:/name/N`.

    A local file or folder needs no tracking server. Registry and run references are
    downloaded into `dst` (a new temporary folder by default).

    Raises:
        InputFileError: a local path without a checkpoint.
        StrokeRayError: a reference MLflow cannot resolve, or whose artifact holds no checkpoint.
    """
    from mlflow.exceptions import MlflowException

    from stroke_ray.checkpoint import checkpoint_file

    local = Path(str(model_ref)).expanduser()
    if local.exists():
        return _checkpoint_in(local)
    ref = parse(model_ref)
    if ref.kind == "path":
        return checkpoint_file(ref.text)
    client = client_for(tracking_uri)
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="stroke-ray-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        if ref.kind == "alias":
            source = client.get_model_version_by_alias(ref.name, ref.alias).source
        elif ref.kind == "version":
            source = client.get_model_version(ref.name, ref.version).source
        else:
            source = _run_source(client, ref)
        downloaded = _download(client, source, dst)
    except MlflowException as exc:
        raise StrokeRayError(f"{ref.text}: cannot resolve in {client.tracking_uri} ({exc.message})") from exc
    try:
        return _checkpoint_in(downloaded)
    except StrokeRayError as exc:
        raise StrokeRayError(f"{ref.text}: the referenced artifact holds no checkpoint.pt") from exc


def pin_version(model_ref: str | Path, tracking_uri: str | None = None) -> str:
    """`models:/name@alias` as the version the alias points at now (`models:/name/N`); any
    other reference unchanged.

    Resolve and label the pinned reference (`resolve_checkpoint`, `version_label`), not
    the alias: the alias is then looked up once, so the weights downloaded and the version
    named are the same even when the alias moves in between.

    Raises:
        StrokeRayError: an alias MLflow cannot resolve.
    """
    if Path(str(model_ref)).expanduser().exists():  # a local path first, as resolve_checkpoint
        return str(model_ref)
    ref = parse(model_ref)
    if ref.kind != "alias":
        return str(model_ref)
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        version = client.get_model_version_by_alias(ref.name, ref.alias).version
    except MlflowException as exc:
        raise StrokeRayError(f"{ref.text}: cannot resolve in {client.tracking_uri} ({exc.message})") from exc
    return version_uri(version, ref.name)


def version_label(model_ref: str | Path, checkpoint: Path, tracking_uri: str | None = None) -> str:
    """A short label for the exact weights being used.

    Registered models are named by their registry version ("stroke-ray-segmenter/v3"), so
    a moved alias shows up; anything else by the checkpoint file's content hash.
    """
    try:
        ref = parse(model_ref)
        if ref.kind == "alias":
            return f"{ref.name}/v{client_for(tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version}"
        if ref.kind == "version":
            return f"{ref.name}/v{int(ref.version)}"
    except Exception:  # noqa: BLE001 - the label is informative only; fall back to the hash
        pass
    file = checkpoint / CHECKPOINT_FILE if checkpoint.is_dir() else checkpoint
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:12]}"


# --------------------------------------------------------------------------- logging, registry


def log_model(
    client,
    run_id: str,
    checkpoint_path: str | Path,
    registered_name: str | None = None,
    artifact_path: str = MODEL_ARTIFACT,
) -> str:
    """Log a checkpoint to the run as an MLflow pyfunc model under `artifact_path`; returns its URI.

    The folder holds MLmodel (signature, pip requirements) and the checkpoint as
    `artifacts/checkpoint.pt` (`mlflow_model.save_pyfunc`), so `mlflow.pyfunc.load_model` and
    `mlflow models serve` work on it, and the run lists it in the UI's model column. The URI
    is `runs:/<run_id>/model`, or `models:/<name>/<version>` when `registered_name` is given
    (a new version of that registered model is created from the run artifact).
    """
    from mlflow.models import Model
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_MODELS

    from stroke_ray.checkpoint import checkpoint_file
    from stroke_ray.mlflow_model import save_pyfunc

    file = checkpoint_file(checkpoint_path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pyfunc(file, Path(tmp) / artifact_path)
        client.log_artifacts(run_id, str(folder), artifact_path)
        # The tag MLflow's own log_model writes: the UI's runs table shows the model from it.
        entry = Model.load(str(folder)).to_dict()
        entry.update(run_id=run_id, artifact_path=artifact_path)
        history = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_MODELS, "[]"))
        client.set_tag(run_id, MLFLOW_LOGGED_MODELS, json.dumps(history + [entry]))
    uri = run_model_uri(run_id, artifact_path)
    if registered_name is None:
        return uri
    version = _create_version(client, registered_name, uri, run_id)
    return version_uri(version, registered_name)


def _create_version(client, name: str, source: str, run_id: str | None, tags: Mapping | None = None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            client.get_registered_model(name)  # created meanwhile by another process
    mv = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    return str(mv.version)


def register_champion(
    model_uri: str,
    name: str = REGISTERED_MODEL,
    alias: str = CHAMPION_ALIAS,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    client=None,
) -> str:
    """Point `name@alias` at `model_uri` (a `runs:/` URI or a version of `name`); returns the version."""
    client = client or client_for(tracking_uri)
    m = _MODELS_VERSION.match(model_uri)
    if m and m["name"] == name:
        version = m["version"]
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version, key, str(value))
    else:
        if m:  # a version of another registered model: register its source under `name`
            src = client.get_model_version(m["name"], m["version"])
            source, run_id = src.source, src.run_id
        else:
            r = _RUNS.match(model_uri)
            source, run_id = model_uri, (r["run_id"] if r else None)
        version = _create_version(client, name, source, run_id, tags)
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def register_run_version(client, run_id: str, checkpoint: Path, tags: Mapping[str, Any] | None = None) -> str:
    """The registry version of `run_id`'s model, logging and registering `checkpoint` the
    first time; `tags` are (re)set on it. The champion alias is not touched.

    Re-running on the same run reuses its registered version instead of adding one.
    """
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'")
    if versions:
        version = str(max(int(v.version) for v in versions))
    else:
        version = _create_version(client, REGISTERED_MODEL, log_model(client, run_id, checkpoint), run_id)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(REGISTERED_MODEL, version, key, str(value))
    return version
