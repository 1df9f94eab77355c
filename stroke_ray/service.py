"""Starting and stopping the HTTP service: authentication rules, the proxy guard, Serve.

`start_server` refuses to listen on anything but a loopback address without a token,
registers the application's limits with the request guard in Serve's proxy
(`http_guard`), checks that the proxy really runs that guard, and deploys the
`serving.StrokeSegmenter` application. `stop_server` deletes that one application (and
its guard rule), never the other Serve applications of a shared cluster.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
from ray import serve

from stroke_ray.auth import is_loopback, token_digest
from stroke_ray.config import mirror_axes
from stroke_ray.errors import ConfigError, StrokeRayError
from stroke_ray.http_guard import (
    GUARD_PATH,
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    GuardRule,
    register_rule,
    remove_rule,
)
from stroke_ray.model_ref import CHAMPION_URI, resolve_checkpoint
from stroke_ray.nifti import ImageLimits
from stroke_ray.raycluster import connect
from stroke_ray.serving import DEFAULT_APP_NAME, PUBLIC_PATHS, ReplicaSettings, build_app
from stroke_ray.uploads import MAX_DECODE_RATIO, UPLOAD_IMAGE_LIMITS

__all__ = ["start_server", "stop_server"]

logger = logging.getLogger(__name__)
GUARD_WAIT_S = 30.0


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _guard_answer(base_url: str) -> dict[str, Any] | None:
    """What `<prefix>/-/guard` says, or None when the proxy answers without the guard."""
    try:
        r = httpx.get(base_url + GUARD_PATH, timeout=5.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        body = r.json()
    except ValueError:
        return None
    return body if body.get("guard") == "stroke-ray" else None


def _wait_for_guard(base_url: str, rule: GuardRule) -> bool:
    """True once the proxy's guard reports `rule` (it reads the registry once a second)."""
    deadline = time.monotonic() + GUARD_WAIT_S
    expected = rule.public()
    while True:
        answer = _guard_answer(base_url)
        if answer is not None and all(answer.get(k) == v for k, v in expected.items()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def start_server(
    model_ref: str | Path = CHAMPION_URI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
    token: str | None = None,
    max_upload_bytes: int = 512 * 1024**2,
    body_timeout_s: float = 120.0,
    idle_timeout_s: float = 20.0,
    request_timeout_s: float | None = 600.0,
    max_concurrent: int = 1,
    max_queued: int = 4,
    reload_interval_s: float = 60.0,
    docs: bool = False,
    device: str | None = None,
    threshold: float | None = None,
    tta_axes: Sequence[int] | None = None,
    image_limits: ImageLimits = UPLOAD_IMAGE_LIMITS,
    max_decode_ratio: float = MAX_DECODE_RATIO,
    **app_options: Any,
) -> str:
    """Deploy the service on Ray (local, or the cluster at `address`) and return its URL.

    Returns once the replicas answer. `app_options` go to `serving.build_app` (replicas,
    autoscaling, GPUs, tracking URI).

    Args:
        host: listen address of Serve's proxy; anything but loopback needs `token`.
        token: bearer token required on every route but /healthz and /readyz.
        max_upload_bytes / body_timeout_s / idle_timeout_s: body limits (413 / 408).
        request_timeout_s: Serve's end-to-end timeout for one request (None: none).
        max_concurrent / max_queued: predictions running / waiting per replica.
        reload_interval_s: how often a replica checks a `models:/name@alias` for a moved alias.
        docs: serve the OpenAPI page at /docs.
        threshold: probability threshold of the mask (None: the model's stored one).
        tta_axes: test-time mirroring axes (() = none; None = all three, as `predict`).
        image_limits: what each uploaded image's header may declare (400/413 beyond it);
            the default, `uploads.UPLOAD_IMAGE_LIMITS`, is smaller than convert's.
        max_decode_ratio: most decoded bytes per uploaded byte (413 beyond it: a bomb).

    Raises:
        ConfigError: bad `tta_axes`, a `max_decode_ratio` below 1.
        StrokeRayError: a non-loopback host without a token; a model reference that does
            not resolve; a non-loopback host whose Serve proxy does not run the guard.
    """
    try:  # checked here so that a bad value fails the command, not every replica
        axes = None if tta_axes is None else mirror_axes(tta_axes)
    except ValueError as exc:
        raise ConfigError(f"--tta-axes: {exc}") from None
    if not max_decode_ratio >= 1:  # a plain .nii decodes to its own size
        raise ConfigError(f"--max-decode-ratio must be at least 1, got {max_decode_ratio}")
    if not is_loopback(host) and token is None:
        raise StrokeRayError(
            f"--host {host}: listening beyond this machine needs a token "
            "(--token-file FILE, or STROKE_RAY_SERVE_TOKEN_FILE / STROKE_RAY_SERVE_TOKEN)")
    digest = token_digest(token) if token is not None else None
    # Fail here, with one clear line, rather than in a replica that retries.
    resolve_checkpoint(model_ref, app_options.get("tracking_uri"))
    connect(address)
    http_options: dict[str, Any] = {"host": host, "port": int(port)}
    if request_timeout_s:
        http_options["request_timeout_s"] = float(request_timeout_s)
    serve.start(http_options=http_options)

    prefix = "/" + route_prefix.strip("/")
    rule = GuardRule(route_prefix=prefix, max_body_bytes=int(max_upload_bytes), body_timeout_s=body_timeout_s,
                     idle_timeout_s=idle_timeout_s, token_sha256=digest, public_paths=PUBLIC_PATHS)
    register_rule(name, rule)
    base_url = f"http://{_probe_host(host)}:{int(port)}{prefix.rstrip('/')}"
    if not _wait_for_guard(base_url, rule):
        message = (f"the Serve proxy at {_probe_host(host)}:{port} does not run the stroke-ray request guard: "
                   f"start Ray with {PROXY_CALLBACK_ENV}={PROXY_CALLBACK} in its environment (docs/security.md)")
        if not is_loopback(host):
            remove_rule(name)
            raise StrokeRayError(message)
        logger.warning("%s; bodies are then only checked in the replica", message)

    settings = ReplicaSettings(max_upload_bytes=int(max_upload_bytes), body_timeout_s=body_timeout_s,
                               token_sha256=digest, max_concurrent=max_concurrent, max_queued=max_queued,
                               reload_interval_s=reload_interval_s, docs=docs, device=device, threshold=threshold,
                               tta_axes=axes, image_limits=image_limits,
                               max_decode_ratio=float(max_decode_ratio))
    try:
        serve.run(build_app(model_ref, settings=settings, **app_options), name=name, route_prefix=prefix,
                  blocking=False)
    except BaseException:
        remove_rule(name)  # no rule left behind for an application that is not there
        raise
    return f"http://{_probe_host(host)}:{int(port)}{prefix.rstrip('/')}"


def stop_server(name: str = DEFAULT_APP_NAME) -> None:
    """Delete this service's application and guard rule; other Serve applications, the
    proxies and Ray itself keep running."""
    try:
        serve.delete(name)
    finally:
        remove_rule(name)
