"""The proxy request guard and token helpers, on a real uvicorn server over real HTTP."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import httpx
import pytest
from helpers import free_port

from stroke_ray.auth import bearer_matches, is_loopback, load_token, token_digest
from stroke_ray.errors import StrokeRayError
from stroke_ray.http_guard import GUARD_PATH, GuardRule, HttpGuard

TOKEN = "s3cret-token-for-tests-0123456789"
LIMIT = 256 * 1024


class Echo:
    """The protected app: answers with what it received (length, digest, control headers)."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = json.dumps({"size": size, "sha256": digest.hexdigest(), "path": scope["path"],
                           "timeout_header": "x-request-timeout-seconds" in headers}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class Server:
    def __init__(self, rules, **limits):
        import uvicorn

        self.echo = Echo()

        async def current_rules():
            return rules

        self.port = free_port()
        app = self.guard = HttpGuard(self.echo, current_rules, **limits)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30, **kw)

    def raw(self, head: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(head)
        return sock


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


RULE = GuardRule(route_prefix="/api", max_body_bytes=LIMIT, body_timeout_s=30, idle_timeout_s=0.5,
                 token_sha256=token_digest(TOKEN))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded():
    with Server([RULE]) as server:
        yield server


def test_a_body_within_the_limit_arrives_whole(guarded):
    payload = bytes(range(256)) * 1000  # 256 000 bytes, just under the limit
    with guarded.client() as c:
        r = c.post("/api/predict", content=payload, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["size"] == len(payload)
        assert r.json()["sha256"] == hashlib.sha256(payload).hexdigest()

        def chunks():  # chunked, no Content-Length
            for i in range(0, len(payload), 10_000):
                yield payload[i:i + 10_000]

        r = c.post("/api/predict", content=chunks(), headers=AUTH)
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(payload).hexdigest()


def test_too_large_is_refused_before_the_app_sees_it(guarded):
    calls = guarded.echo.calls
    with guarded.client() as c:
        declared = c.post("/api/predict", content=b"\0" * (LIMIT + 1), headers=AUTH)
        assert declared.status_code == 413 and str(LIMIT) in declared.json()["error"]

        def chunks():
            for _ in range(LIMIT // 65536 + 4):
                yield b"\0" * 65536

        counted = c.post("/api/predict", content=chunks(), headers=AUTH)
        assert counted.status_code == 413
        assert "content-length" not in {k.lower() for k in counted.request.headers}
    assert guarded.echo.calls == calls


def test_token_is_required_except_on_health_paths(guarded):
    with guarded.client() as c:
        missing = c.post("/api/predict", content=b"x")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        wrong = c.post("/api/predict", content=b"x", headers={"Authorization": "Bearer " + "x" * 32})
        assert wrong.status_code == 401
        assert c.get("/api/admin/reload").status_code == 401
        assert c.get("/api/healthz").status_code == 200
        assert c.get("/api/readyz").status_code == 200
        assert c.post("/api/predict", content=b"x", headers=AUTH).status_code == 200


def test_unauthenticated_upload_is_refused_without_reading_it(guarded):
    # Headers announce 100 MB; the 401 comes back although not one body byte was sent.
    sock = guarded.raw(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    with sock:
        assert _status(sock) == 401


def test_a_stalled_upload_gets_408_and_others_are_served_meanwhile(guarded):
    head = (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Length: 1000\r\n\r\n")
    slow = [guarded.raw(head + b"abc") for _ in range(4)]
    try:
        with guarded.client() as c:
            assert c.get("/api/healthz").status_code == 200
            assert c.post("/api/predict", content=b"ok", headers=AUTH).status_code == 200
        for sock in slow:
            assert _status(sock) == 408
    finally:
        for sock in slow:
            sock.close()


def test_client_cannot_switch_off_the_proxy_timeout(guarded):
    with guarded.client() as c:
        r = c.get("/api/healthz", headers={"x-request-timeout-seconds": "0"})
        assert r.status_code == 200 and r.json()["timeout_header"] is False


def test_guard_path_reports_the_limits_not_the_token(guarded):
    with guarded.client() as c:
        body = c.get("/api" + GUARD_PATH).json()
    assert body["guard"] == "stroke-ray" and body["max_body_bytes"] == LIMIT
    assert body["authentication"] is True and "token_sha256" not in json.dumps(body)


def test_paths_outside_every_prefix_pass_untouched(guarded):
    with guarded.client() as c:
        r = c.post("/other", content=b"\0" * (LIMIT * 2))
    assert r.status_code == 200 and r.json()["size"] == LIMIT * 2


def test_buffer_budget_and_pending_uploads_are_bounded():
    rule = GuardRule(route_prefix="/", max_body_bytes=LIMIT, idle_timeout_s=30, body_timeout_s=60)
    with Server([rule], max_buffered_bytes=LIMIT // 2, max_pending=1) as server:
        with server.client() as c:
            # A declared body over what the proxy may hold at once: 503, not buffered.
            busy = c.post("/predict", content=b"\0" * (LIMIT - 1))
            assert busy.status_code == 503 and busy.headers["retry-after"]
            assert c.post("/predict", content=b"\0" * 1000).status_code == 200
            # One upload in progress is the maximum: the next one is turned away. The next
            # request is sent once the guard counts the stalled upload (its connection is
            # accepted and read on the server's own schedule, after the client's sendall).
            with server.raw(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab"):
                for _ in range(200):
                    if server.guard.budget.pending == 1:
                        break
                    time.sleep(0.025)
                assert server.guard.budget.pending == 1, "the stalled upload never reached the guard"
                second = c.post("/predict", content=b"\0" * 10)
            assert second.status_code == 503
            # Once it is gone, uploads are accepted again.
            for _ in range(100):
                if c.post("/predict", content=b"\0" * 10).status_code == 200:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("uploads still refused after the pending one went away")


# -- tokens


def test_token_from_file_or_environment(tmp_path):
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    assert load_token(file, environ={}) == TOKEN
    assert load_token(None, environ={"STROKE_RAY_SERVE_TOKEN_FILE": str(file)}) == TOKEN
    assert load_token(None, environ={"STROKE_RAY_SERVE_TOKEN": TOKEN}) == TOKEN
    assert load_token(None, environ={}) is None
    with pytest.raises(StrokeRayError, match="at least 16"):
        load_token(None, environ={"STROKE_RAY_SERVE_TOKEN": "short"})
    with pytest.raises(StrokeRayError, match="missing-token"):
        load_token(tmp_path / "missing-token", environ={})


def test_bearer_check_and_loopback_hosts():
    digest = token_digest(TOKEN)
    assert bearer_matches(f"Bearer {TOKEN}", digest) and bearer_matches(f"bearer  {TOKEN} ", digest)
    assert not bearer_matches(None, digest) and not bearer_matches(TOKEN, digest)
    assert not bearer_matches("Bearer wrong-token-0123456789", digest)
    assert bearer_matches(None, None)
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org", "192.168.1.2"))


def test_serve_refuses_a_public_bind_without_a_token(tmp_path):
    from stroke_ray.service import start_server

    for host in ("0.0.0.0", "10.1.2.3"):
        with pytest.raises(StrokeRayError, match="token"):
            start_server(tmp_path / "checkpoint.pt", host=host, port=free_port())


def test_the_openapi_schema_lists_the_routes_though_fastapi_serves_no_docs():
    from stroke_ray.serving import app

    assert app.docs_url is None and app.openapi_url is None and app.redoc_url is None
    paths = app.openapi()["paths"]
    assert {"/predict", "/healthz", "/readyz", "/admin/reload"} <= set(paths)
