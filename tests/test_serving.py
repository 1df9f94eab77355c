"""The HTTP service on a real local Ray Serve, spoken to over real HTTP."""

from __future__ import annotations

import gzip
import os
import socket
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from helpers import case_files, free_port, make_checkpoint

from stroke_ray import model_ref, tracking
from stroke_ray.nifti import ImageLimits
from stroke_ray.uploads import UPLOAD_IMAGE_LIMITS

LIMIT = 16 * 1024**2  # the three sample files are ~6 MB together
TOKEN = "serve-test-token-0123456789abcdef"
CHAMPION = model_ref.CHAMPION_URI
REGISTERED = model_ref.REGISTERED_MODEL

pytestmark = pytest.mark.slow


def at(client: httpx.Client, path: str) -> str:
    """An absolute URL on the server, for requests made without the client's token."""
    return str(client.base_url).rstrip("/") + path


def rss_mib(title: str) -> float:
    """Resident memory of this test session's process whose title starts with `title`
    (Linux /proc; only descendants of this process, not other Ray instances here)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    todo = [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            return int(line.split()[1]) / 1024
            except OSError:
                continue
    raise LookupError(title)


class Registry:
    """A SQLite MLflow registry whose champion is a tiny checkpoint (version 1)."""

    def __init__(self, root: Path):
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.client = tracking.client_for(self.uri)
        self.experiment = tracking.get_or_create_experiment(self.client, "serve-tests")
        self.root = root
        self.register(make_checkpoint(root / "v1"))

    def register(self, checkpoint: Path) -> str:
        run = self.client.create_run(self.experiment).info.run_id
        return model_ref.register_champion(model_ref.log_model(self.client, run, checkpoint), tracking_uri=self.uri)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    return Registry(tmp_path_factory.mktemp("serve-registry"))


# The server's own image limits: the sample case's largest axis is 512 (FLAIR), so 600 accepts
# it and refuses an image 640 voxels long that the default (1024) would take.
SERVED_LIMITS = ImageLimits(max_dim=600, max_decoded_bytes=UPLOAD_IMAGE_LIMITS.max_decoded_bytes)


@pytest.fixture(scope="module")
def server(ray_local, registry):
    from stroke_ray.service import start_server, stop_server

    url = start_server(CHAMPION, port=free_port(), tracking_uri=registry.uri, token=TOKEN, cpus_per_replica=0.5,
                       max_upload_bytes=LIMIT, idle_timeout_s=60, body_timeout_s=120, reload_interval_s=0,
                       max_concurrent=1, max_queued=2, image_limits=SERVED_LIMITS)
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client
    stop_server()


@pytest.fixture(scope="module")
def uploads(isles_sample) -> dict[str, tuple[str, bytes]]:
    return {m: (p.name, p.read_bytes()) for m, p in case_files(isles_sample).items()}


def assert_alive(server: httpx.Client) -> None:
    health = server.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_model_label_names_references_as_given_and_paths_by_their_last_parts():
    from stroke_ray.serving import model_label

    for ref in (CHAMPION, f"models:/{REGISTERED}/3", "runs:/abc123/model"):
        assert model_label(ref) == ref
    assert model_label("/srv/models/best/checkpoint.pt") == "best/checkpoint.pt"


def test_healthz_names_model_and_version(server, registry):
    r = httpx.get(at(server, "/healthz"))  # no token needed
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["model"] == CHAMPION
    assert body["version"] == f"{REGISTERED}/v1"
    assert r.headers["x-model-version"] == body["version"]
    assert str(registry.root) not in r.text
    ready = httpx.get(at(server, "/readyz"))
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_predict_returns_mask_on_the_uploaded_grid(server, uploads, isles_sample):
    r = server.post("/predict", files=uploads)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert r.headers["x-model-version"] == f"{REGISTERED}/v1"
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
        ("dwi", b"this is not an image" * 50, 400, ["dwi", "not a readable NIfTI"]),
        ("dwi", "truncate", 400, ["dwi", "truncated"]),
        ("adc", _two_d_nifti(), 400, ["adc", "3D", "(16, 16)"]),
        ("adc", _four_d_nifti(), 400, ["adc", "3D", "4D", "3 volumes"]),
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
    assert r.headers["x-model-version"] == f"{REGISTERED}/v1"
    message = r.json()["error"]
    for word in words:
        assert word in message
    assert_alive(server)


def _bomb() -> bytes:
    """~70 KB of .nii.gz whose header declares a 512 x 512 x 256 volume (64 MiB of zeros)."""
    return gzip.compress(nib.Nifti1Image(np.zeros((512, 512, 256), np.uint8), np.eye(4)).to_bytes(), 9)


def test_decompression_bombs_are_refused_before_decoding(server, uploads):
    bomb = _bomb()
    before = rss_mib("ray::ServeReplica")
    files = {m: (f"bomb_{m}.nii.gz", bomb) for m in uploads}
    r = server.post("/predict", files=files)
    assert r.status_code == 413, r.text
    assert r.json()["field"] == "dwi" and "200x" in r.json()["problem"]
    # One bomb among real files: refused by its field, the others untouched.
    r = server.post("/predict", files={**uploads, "flair": ("flair.nii.gz", bomb)})
    assert r.status_code == 413 and r.json()["field"] == "flair"
    grown = rss_mib("ray::ServeReplica") - before
    assert grown < 64, f"replica grew {grown:.0f} MiB"  # a decoded bomb alone is 64 MiB (x4 as float32)
    assert_alive(server)


def test_the_servers_image_limits_reach_its_replicas(server, uploads):
    long = gzip.compress(nib.Nifti1Image(np.ones((640, 4, 4), np.float32), np.eye(4)).to_bytes())
    r = server.post("/predict", files={**uploads, "dwi": ("dwi.nii.gz", long)})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "dwi"
    assert r.json()["problem"] == "image of shape (640, 4, 4) is larger than the limit of 600 voxels per axis"
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
    assert missing.status_code == 404 and missing.headers["x-model-version"].startswith(REGISTERED)
    wrong = server.get("/predict")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_bad_model_ref_fails_before_deploying(ray_local, tmp_path):
    from stroke_ray.errors import StrokeRayError
    from stroke_ray.service import start_server

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


# -- security: token, proxy guard, slow clients, docs, reload, stopping


def test_predict_needs_the_token(server, uploads):
    assert httpx.post(at(server, "/predict"), files=uploads, timeout=60).status_code == 401
    wrong = httpx.post(at(server, "/predict"), files=uploads, timeout=60, headers={"Authorization": "Bearer " + "x" * 32})
    assert wrong.status_code == 401
    assert httpx.post(at(server, "/admin/reload"), timeout=60).status_code == 401


def test_the_proxy_runs_the_guard_with_this_apps_limits(server):
    body = server.get("/-/guard").json()
    assert body["guard"] == "stroke-ray" and body["max_body_bytes"] == LIMIT and body["authentication"] is True


def test_an_oversized_upload_leaves_the_proxy_small(server):
    before = rss_mib("ray::ProxyActor")
    sent = 0

    def chunks():  # 16x the limit, chunked: only counting can refuse it
        nonlocal sent
        for _ in range(16 * LIMIT // 1024**2):
            sent += 1024**2
            yield b"\0" * 1024**2

    r = server.post("/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413, r.text
    grown = rss_mib("ray::ProxyActor") - before
    # The guard holds at most the limit (16 MiB) of it; without it the proxy queues it all.
    assert grown < 3 * LIMIT / 1024**2, f"proxy grew {grown:.0f} MiB"
    assert_alive(server)


def test_health_and_predictions_are_answered_while_slow_clients_hang(server, uploads):
    host, port = server.base_url.host, server.base_url.port
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n--x\r\n").encode()
    # More stalled uploads than the replica has prediction slots and queue places together.
    slow = []
    try:
        for _ in range(6):
            sock = socket.create_connection((host, port), timeout=60)
            sock.sendall(head)
            slow.append(sock)
        for path in ("/healthz", "/readyz"):
            assert server.get(path).status_code == 200
        r = server.post("/predict", params={"format": "json"}, files=uploads)
        assert r.status_code == 200, r.text
    finally:
        for sock in slow:
            sock.close()


def test_docs_are_off_unless_asked(server):
    assert server.get("/docs").status_code == 404
    assert server.get("/openapi.json").status_code == 404


def test_reload_follows_the_alias_and_a_failed_reload_tells_no_internals(server, registry, uploads):
    from stroke_ray.model_ref import CHAMPION_ALIAS, REGISTERED_MODEL

    assert registry.register(make_checkpoint(registry.root / "v2", bias=-5.0)) == "2"
    r = server.post("/admin/reload")
    assert r.status_code == 200, r.text
    assert r.json() == {"previous": f"{REGISTERED_MODEL}/v1", "version": f"{REGISTERED_MODEL}/v2", "changed": True}
    again = server.post("/admin/reload").json()
    assert again["changed"] is False
    predicted = server.post("/predict", params={"format": "json"}, files=uploads)
    assert predicted.json()["model_version"] == f"{REGISTERED_MODEL}/v2"
    assert predicted.json()["lesion_count"] == 0  # v2 pins every logit to -5

    registry.client.delete_registered_model_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
    try:
        failed = server.post("/admin/reload")
        assert failed.status_code == 500
        body = failed.json()
        assert body["request_id"] and body["request_id"] == failed.headers["x-request-id"]
        assert body["version"] == f"{REGISTERED_MODEL}/v2"
        for secret in (str(registry.root), "sqlite", "Traceback", "MlflowException", CHAMPION_ALIAS):
            assert secret not in failed.text
        assert_alive(server)
    finally:
        registry.client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION_ALIAS, "2")


def test_stopping_deletes_only_this_application(server):
    from ray import serve

    from stroke_ray.service import stop_server

    @serve.deployment(name="Neighbour", ray_actor_options={"num_cpus": 0})
    def neighbour(request) -> str:
        return "still here"

    serve.run(neighbour.bind(), name="neighbour", route_prefix="/neighbour")
    stop_server()
    apps = serve.status().applications
    assert "neighbour" in apps and "stroke-ray" not in apps
    # The proxy re-reads the guard's rules at most once a second: a few tries at most.
    for _ in range(20):
        answer = httpx.get(f"http://{server.base_url.host}:{server.base_url.port}/neighbour", timeout=60)
        if answer.status_code == 200:
            break
        time.sleep(0.5)
    assert answer.text == "still here"
    serve.delete("neighbour")
