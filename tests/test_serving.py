"""The HTTP service on a real local Ray Serve, spoken to over real HTTP."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from helpers import case_files, free_port, make_checkpoint

# Ray Train / Tune / Serve: the whole module is in the slow suite.
pytestmark = pytest.mark.slow

LIMIT = 16 * 1024**2  # the three sample files are ~6 MB together


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def server(ray_local, checkpoint):
    from stroke_ray.serving import start_server, stop_server

    url = start_server(checkpoint, port=free_port(), cpus_per_replica=0.5, max_upload_bytes=LIMIT)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    stop_server()


@pytest.fixture(scope="module")
def uploads(isles_sample) -> dict[str, tuple[str, bytes]]:
    return {m: (p.name, p.read_bytes()) for m, p in case_files(isles_sample).items()}


def assert_alive(server: httpx.Client) -> None:
    health = server.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_healthz_names_model_and_version(server, checkpoint):
    r = server.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["model"] == str(checkpoint)
    assert body["version"].startswith("sha256:")
    assert r.headers["x-model-version"] == body["version"]


def test_predict_returns_mask_on_the_uploaded_grid(server, uploads, isles_sample):
    r = server.post("/predict", files=uploads)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert r.headers["x-model-version"].startswith("sha256:")
    assert "sub-strokecase0009_ses-0001_dwi_mask.nii.gz" in r.headers["content-disposition"]
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    dwi = nib.load(case_files(isles_sample)["dwi"])
    assert mask.shape == (112, 112, 73)
    assert np.allclose(mask.affine, dwi.affine)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}


def test_predict_json_by_query_and_by_accept(server, uploads):
    by_query = server.post("/predict", params={"format": "json"}, files=uploads)
    assert by_query.status_code == 200, by_query.text
    body = by_query.json()
    assert body["shape"] == [112, 112, 73]
    assert body["volume_ml"] >= 0 and body["lesion_count"] >= 0
    assert body["model_version"] == by_query.headers["x-model-version"]
    # An uncompressed .nii upload is accepted too.
    name, data = uploads["dwi"]
    plain = {**uploads, "dwi": (name.removesuffix(".gz"), gzip.decompress(data))}
    by_accept = server.post("/predict", files=plain, headers={"Accept": "application/json"})
    assert by_accept.status_code == 200, by_accept.text
    assert by_accept.json() == body


def _two_d_nifti() -> bytes:
    return nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)).to_bytes()


def _four_d_nifti() -> bytes:
    return gzip.compress(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)).to_bytes())


@pytest.mark.parametrize(
    ("field", "content", "status", "words"),
    [
        ("flair", None, 422, ["flair", "missing"]),
        ("dwi", b"this is not an image" * 50, 400, ["dwi", "not a NIfTI"]),
        ("dwi", "truncate", 400, ["dwi", "gzip"]),
        ("adc", _two_d_nifti(), 400, ["adc", "3D", "(16, 16)"]),
        ("adc", _four_d_nifti(), 400, ["adc", "3D", "(8, 8, 8, 3)"]),
        ("dwi", b"", 400, ["dwi", "empty"]),
    ],
    ids=["missing-modality", "not-nifti", "truncated-gzip", "2d", "4d", "empty"],
)
def test_bad_uploads_get_one_clear_4xx(server, uploads, field, content, status, words):
    files = dict(uploads)
    if content is None:
        del files[field]
    elif content == "truncate":
        name, data = files[field]
        files[field] = (name, data[: len(data) // 2])
    else:
        files[field] = ("upload.nii.gz", content)
    r = server.post("/predict", files=files)
    assert r.status_code == status, r.text
    assert r.headers["x-model-version"].startswith("sha256:")
    message = r.json()["error"]
    for word in words:
        assert word in message
    assert_alive(server)


def test_not_multipart_is_400(server):
    r = server.post("/predict", json={"dwi": "a.nii.gz"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    assert_alive(server)


def test_too_large_by_content_length_and_by_counting(server, uploads):
    big = {**uploads, "dwi": ("big.nii.gz", b"\0" * (LIMIT + 1024))}
    declared = server.post("/predict", files=big)
    assert declared.status_code == 413, declared.text
    assert str(LIMIT) in declared.json()["error"]
    assert_alive(server)

    # Chunked upload without Content-Length: refused while the body is being counted.
    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"dwi\"; filename=\"a.nii\"\r\n\r\n"
        for _ in range(LIMIT // (1024**2) + 2):
            yield b"\0" * 1024**2

    counted = server.post("/predict", content=chunks(),
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert counted.status_code == 413, counted.text
    assert "content-length" not in {k.lower() for k in counted.request.headers}
    assert_alive(server)


def test_unknown_route_and_wrong_method_carry_the_version(server):
    missing = server.get("/nope")
    assert missing.status_code == 404 and missing.headers["x-model-version"].startswith("sha256:")
    wrong = server.get("/predict")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_bad_model_ref_fails_before_deploying(ray_local, tmp_path):
    from stroke_ray.errors import StrokeRayError
    from stroke_ray.serving import start_server

    with pytest.raises(StrokeRayError, match="nope"):
        start_server(tmp_path / "nope" / "checkpoint.pt", port=free_port(),
                     tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def test_serve_command_reports_a_bad_model_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from stroke_ray.cli import app

    missing = tmp_path / "missing-checkpoint"
    result = CliRunner().invoke(app, ["serve", "-m", str(missing), "--port", str(free_port()),
                                      "--min-replicas", "1", "--max-replicas", "2"])
    assert result.exit_code == 2, result.output
    assert str(missing) in result.output and "Traceback" not in result.output
