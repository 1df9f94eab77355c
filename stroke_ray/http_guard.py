"""The request guard that runs inside Ray Serve's HTTP proxy, before the proxy buffers a body.

What Ray 2.60's proxy does on its own (measured, see docs/security.md): as soon as a
request is routed, it reads the client's body into an unbounded in-memory queue while
the replica is still busy or before it has looked at a byte, so a 1 GiB upload makes the
proxy 1 GiB larger before any size check in the application can answer 413; and a
client that trickles its body holds a replica slot (`max_ongoing_requests`) for as long
as it likes. Clients may also send `x-request-timeout-seconds: 0` to switch off the
proxy's request timeout.

`HttpGuard` is a plain ASGI middleware that Serve installs in every proxy when the
proxy's process has `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=stroke_ray.http_guard:
proxy_middlewares` in its environment (`raycluster.connect` sets it for a local Ray,
cluster.yaml for the cluster). For every path under a stroke-ray application's route
prefix it:

* drops the client's Serve control headers (`x-request-timeout-seconds`,
  `x-request-disconnect-disabled`);
* answers 401 to a request without the application's bearer token, except on the public
  health paths, before reading any body;
* answers 413 when `Content-Length` is over the limit, without reading the body;
* reads the whole body itself, counting bytes (413 at the first byte over the limit),
  within a deadline and an idle timeout (408), and within a proxy-wide budget of
  buffered bytes and of bodies in flight (503 + Retry-After): only a complete body is
  handed to the proxy, so a slow client never holds a replica slot and the proxy's
  memory for bodies stays under the budget.

The limits of each application (`GuardRule`) live in a small named Ray actor
(`GuardRegistry`) that `service.start_server` fills before deploying; the proxy reads it
at most once a second. `GET <prefix>/-/guard` is answered by the guard itself, so a
caller can tell whether the proxy it talks to is guarded and with which limits.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

import ray

from stroke_ray.auth import bearer_matches
from stroke_ray.ray_compat import SERVE_CLIENT_CONTROL_HEADERS, SERVE_PROXY_CALLBACK_ENV

__all__ = [
    "GUARD_PATH",
    "PROXY_CALLBACK",
    "PROXY_CALLBACK_ENV",
    "GuardRule",
    "HttpGuard",
    "proxy_environment",
    "proxy_middlewares",
    "register_rule",
    "remove_rule",
]

PROXY_CALLBACK_ENV = SERVE_PROXY_CALLBACK_ENV
PROXY_CALLBACK = "stroke_ray.http_guard:proxy_middlewares"
GUARD_PATH = "/-/guard"
# Proxy-wide limits, read once when a proxy starts (they bound that process's memory).
BUFFER_BUDGET_ENV = "STROKE_RAY_GUARD_BUFFER_BYTES"
MAX_PENDING_ENV = "STROKE_RAY_GUARD_MAX_PENDING"
DEFAULT_BUFFER_BUDGET = 1024**3
DEFAULT_MAX_PENDING = 64
# Headers with which a client could change how Serve's proxy treats its request.
_SERVE_CONTROL_HEADERS = {name.encode() for name in SERVE_CLIENT_CONTROL_HEADERS}
_REGISTRY_NAME, _REGISTRY_NAMESPACE = "stroke-ray-http-guard", "stroke_ray"
_RULES_TTL_S = 1.0
# Bodies are handed on in pieces of about this size (not one join: no second copy).
_PIECE_BYTES = 1024**2

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class GuardRule:
    """The limits of one application, by its route prefix.

    Attributes:
        route_prefix: paths at or under it are guarded ("/" guards every path).
        max_body_bytes: largest accepted request body.
        body_timeout_s: the whole body must arrive within this many seconds.
        idle_timeout_s: longest pause between two pieces of a body.
        token_sha256: hex digest of the bearer token, or None for no authentication.
        public_paths: paths (relative to the prefix) answered without a token.
    """

    route_prefix: str = "/"
    max_body_bytes: int = 512 * 1024**2
    body_timeout_s: float = 120.0
    idle_timeout_s: float = 20.0
    token_sha256: str | None = None
    public_paths: tuple[str, ...] = ("/healthz", "/readyz")

    def covers(self, path: str) -> bool:
        prefix = self.route_prefix.rstrip("/")
        return not prefix or path == prefix or path.startswith(prefix + "/")

    def relative(self, path: str) -> str:
        return path[len(self.route_prefix.rstrip("/")):] or "/"

    def public(self) -> dict[str, Any]:
        """What `GET <prefix>/-/guard` shows: the limits, not the token digest."""
        shown = {k: v for k, v in asdict(self).items() if k != "token_sha256"}
        return {**shown, "public_paths": list(self.public_paths), "authentication": self.token_sha256 is not None}


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Budget:
    """Bytes of request bodies held by the guard, and bodies being read, proxy-wide."""

    def __init__(self, max_bytes: int, max_pending: int):
        self.max_bytes, self.max_pending = max_bytes, max_pending
        self.bytes = self.pending = 0

    def take(self, n: int) -> bool:
        if self.bytes + n > self.max_bytes:
            return False
        self.bytes += n
        return True


async def _respond(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class HttpGuard:
    """ASGI middleware enforcing the `GuardRule` of the application a path belongs to.

    Args:
        app: the ASGI app to protect (Serve's proxy).
        rules: an async callable returning the current rules (longest prefix wins).
        max_buffered_bytes: proxy-wide budget of body bytes held at once.
        max_pending: proxy-wide number of bodies being read at once.
    """

    def __init__(self, app, rules: Callable[[], Awaitable[list[GuardRule]]],
                 max_buffered_bytes: int = DEFAULT_BUFFER_BUDGET, max_pending: int = DEFAULT_MAX_PENDING):
        self.app, self.rules = app, rules
        self.budget = _Budget(int(max_buffered_bytes), int(max_pending))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", [])
                                      if k.lower() not in _SERVE_CONTROL_HEADERS]}
        path = scope.get("path", "/")
        covering = [r for r in await self.rules() if r.covers(path)]
        if not covering:
            await self.app(scope, receive, send)
            return
        rule = max(covering, key=lambda r: len(r.route_prefix.rstrip("/")))
        relative = rule.relative(path)
        if relative == GUARD_PATH and scope["method"] in ("GET", "HEAD"):
            await _respond_json(send, {"guard": "stroke-ray", **rule.public()})
            return
        try:
            await self._guarded(rule, relative, scope, receive, send)
        except _Refused as refused:
            await _respond(send, refused.status, refused.message, refused.headers)

    async def _guarded(self, rule: GuardRule, relative: str, scope: Scope, receive: Receive, send: Send) -> None:
        if relative not in rule.public_paths and not bearer_matches(_header(scope, b"authorization"), rule.token_sha256):
            raise _Refused(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": 'Bearer realm="stroke-ray"'})
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and _header(scope, b"content-length") in (None, "0") \
                and _header(scope, b"transfer-encoding") is None:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _Refused(400, "malformed Content-Length")
            if int(declared) > rule.max_body_bytes:
                raise _Refused(413, f"request body of {int(declared)} bytes exceeds the limit of "
                                    f"{rule.max_body_bytes} bytes")
        if self.budget.pending >= self.budget.max_pending:
            raise _Refused(503, "too many uploads in progress; retry later", {"Retry-After": "5"})
        self.budget.pending += 1
        held = 0
        try:
            # Reserve a declared length up front, so that many large uploads cannot all
            # start and then find the budget spent half-way through.
            if declared is not None:
                if not self.budget.take(int(declared)):
                    raise _Refused(503, "the server is busy with other uploads; retry later", {"Retry-After": "5"})
                held = int(declared)
            pieces, held = await self._read_body(rule, receive, held)
        finally:
            self.budget.pending -= 1
        try:
            await self.app(scope, _replay(pieces, receive), send)
        finally:
            self.budget.bytes -= held

    async def _read_body(self, rule: GuardRule, receive: Receive, held: int) -> tuple[list[bytes], int]:
        """The body as pieces of about 1 MiB; `held` grows with what was not reserved."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rule.body_timeout_s
        pieces, piece, size = [], bytearray(), 0
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _Refused(408, f"request body not received within {rule.body_timeout_s:g} s")
                try:
                    message = await asyncio.wait_for(receive(), timeout=min(rule.idle_timeout_s, remaining))
                except asyncio.TimeoutError:
                    raise _Refused(408, f"request body stalled (no data for {rule.idle_timeout_s:g} s "
                                        f"or not complete within {rule.body_timeout_s:g} s)") from None
                if message["type"] == "http.disconnect":
                    raise _Refused(400, "client disconnected during the upload")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > rule.max_body_bytes:
                    raise _Refused(413, f"request body exceeds the limit of {rule.max_body_bytes} bytes")
                if size > held:
                    if not self.budget.take(size - held):
                        raise _Refused(503, "the server is busy with other uploads; retry later",
                                       {"Retry-After": "5"})
                    held = size
                piece += chunk
                if len(piece) >= _PIECE_BYTES:
                    pieces.append(bytes(piece))
                    piece = bytearray()
                if not message.get("more_body", False):
                    break
        except BaseException:
            self.budget.bytes -= held
            raise
        pieces.append(bytes(piece))
        return pieces, held


def _replay(pieces: list[bytes], receive: Receive) -> Receive:
    """A `receive` that hands the buffered body on, then waits for the client's disconnect."""
    queue = list(pieces)

    async def replay() -> Message:
        if queue:
            body = queue.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(queue)}
        return await receive()

    return replay


async def _respond_json(send: Send, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- the rules, shared between `start_server` (writes) and every proxy (reads)


@ray.remote(num_cpus=0)
class GuardRegistry:
    """{application name: GuardRule as a dict}, with a version that changes on each write."""

    def __init__(self):
        self.rules: dict[str, dict[str, Any]] = {}

    def put(self, app_name: str, rule: dict[str, Any]) -> None:
        self.rules[app_name] = rule

    def remove(self, app_name: str) -> None:
        self.rules.pop(app_name, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self.rules)


def _registry(create: bool):
    if create:
        return GuardRegistry.options(name=_REGISTRY_NAME, namespace=_REGISTRY_NAMESPACE,
                                     lifetime="detached", get_if_exists=True).remote()
    return ray.get_actor(_REGISTRY_NAME, namespace=_REGISTRY_NAMESPACE)


def register_rule(app_name: str, rule: GuardRule) -> None:
    """Set the guard's limits for `app_name` (the caller must be connected to Ray)."""
    ray.get(_registry(create=True).put.remote(app_name, asdict(rule)))


def remove_rule(app_name: str) -> None:
    """Forget `app_name`'s limits (no error when there were none)."""
    try:
        ray.get(_registry(create=False).remove.remote(app_name))
    except ValueError:
        pass


class _RegistryRules:
    """The registry's rules as the proxy sees them: refreshed at most once per second.

    A registry that cannot be reached keeps the last rules seen (never fewer), so a
    restart of the registry does not switch protection off for running applications.
    """

    def __init__(self):
        self.rules: list[GuardRule] = []
        self.fetched = float("-inf")
        self.lock = asyncio.Lock()

    async def __call__(self) -> list[GuardRule]:
        if time.monotonic() - self.fetched < _RULES_TTL_S:
            return self.rules
        async with self.lock:
            if time.monotonic() - self.fetched >= _RULES_TTL_S:
                try:
                    loop = asyncio.get_running_loop()
                    handle = await loop.run_in_executor(None, _registry, False)
                    snapshot = await handle.snapshot.remote()
                    self.rules = [GuardRule(**{**r, "public_paths": tuple(r["public_paths"])})
                                  for r in snapshot.values()]
                except (ValueError, ray.exceptions.RayError):
                    pass  # no registry yet, or gone: keep what we had
                self.fetched = time.monotonic()
        return self.rules


def proxy_middlewares() -> list:
    """What Serve's proxy calls (via `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    from starlette.middleware import Middleware

    budget = int(os.environ.get(BUFFER_BUDGET_ENV, DEFAULT_BUFFER_BUDGET))
    pending = int(os.environ.get(MAX_PENDING_ENV, DEFAULT_MAX_PENDING))
    return [Middleware(HttpGuard, rules=_RegistryRules(), max_buffered_bytes=budget, max_pending=pending)]


def proxy_environment() -> dict[str, str]:
    """The environment a Ray node needs so that its Serve proxies run the guard."""
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK}
