"""HTTP lesion segmentation on Ray Serve.

One deployment (`StrokeSegmenter`, a FastAPI ingress) holds a checkpoint loaded with
`weights_only=True` (the registered champion by default) and answers:

    POST /predict        multipart upload, one file field per modality of the model
                         (e.g. dwi, adc, flair; .nii or .nii.gz) -> the mask as .nii.gz on
                         the uploaded reference modality's grid, or JSON with ?format=json /
                         Accept: application/json
    GET  /healthz        liveness: {"status": "ok", "model": ..., "version": ...}
    GET  /readyz         readiness: 200 when a prediction would be accepted now, else 503
    POST /admin/reload   re-resolve the model reference (a moved alias) and load it
    GET  /docs           the OpenAPI page, only when deployed with docs=True

Every response carries `X-Model-Version`. With a token configured, everything but
/healthz and /readyz needs `Authorization: Bearer <token>`. A bad upload gets one 4xx
naming the field and the problem and never takes the replica down; a failure of the
model itself gets a 500 with the request id only (the exception goes to the replica log
under that id).

Predictions run at most `max_concurrent` at a time per replica, with at most `max_queued`
more waiting; beyond that a request gets 503 at once. The health routes take no part in
that queue, and the deployment's `max_ongoing_requests` leaves room for them, so they
answer while every prediction slot is busy. The request guard in Serve's proxy
(`http_guard`, registered by `start_server`) limits bodies, slow uploads and
unauthenticated requests before they reach a replica.

Ray Serve is used rather than a bare uvicorn process because it gives replicas,
request-driven autoscaling and GPU placement on the same Ray cluster that trains the
models, with no extra infrastructure.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on
# the route signatures after Serve has pickled the app.
import asyncio
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.concurrency import run_in_threadpool

from stroke_ray.auth import bearer_matches
from stroke_ray.errors import InputFileError, StrokeRayError
from stroke_ray.files import NIFTI_SUFFIXES, strip_nifti_suffix
from stroke_ray.ingest import load_case
from stroke_ray.locations import absolute
from stroke_ray.model_ref import CHAMPION_URI, parse, version_label
from stroke_ray.nifti import ImageLimits
from stroke_ray.predict import lesion_stats, like_reference, nifti_bytes
from stroke_ray.segmenter import Segmenter
from stroke_ray.tracking import default_tracking_uri
from stroke_ray.uploads import (
    MAX_DECODE_RATIO,
    UPLOAD_IMAGE_LIMITS,
    UploadError,
    read_body,
    read_form_files,
    read_nifti,
)

__all__ = ["DEFAULT_APP_NAME", "ReplicaSettings", "StrokeSegmenter", "VERSION_HEADER", "app", "build_app"]

DEFAULT_APP_NAME = "stroke-ray"
VERSION_HEADER = "X-Model-Version"
PUBLIC_PATHS = ("/healthz", "/readyz")
logger = logging.getLogger("ray.serve")

# The OpenAPI page is off unless a deployment asks for it (ReplicaSettings.docs).
app = FastAPI(title="stroke-ray", description="3D ischemic-stroke lesion segmentation of MRI volumes.",
              docs_url=None, redoc_url=None, openapi_url=None)


@dataclass(frozen=True)
class ReplicaSettings:
    """How one replica treats requests (validated by `start_server`'s caller, the CLI).

    Attributes:
        max_upload_bytes: largest request body.
        body_timeout_s: the body must have arrived within this many seconds.
        token_sha256: digest of the bearer token (auth.token_digest), or None.
        max_concurrent: predictions running at once.
        max_queued: predictions waiting for a slot; more get 503.
        reload_interval_s: check a `models:/name@alias` reference for a moved alias this
            often and load the new version (0: only on POST /admin/reload).
        docs: serve /docs and /openapi.json.
        device: torch device ("cpu", "cuda"); None picks the GPU when there is one.
        threshold: probability threshold of the mask; None = the model's stored one.
        tta_axes: test-time mirroring axes (() = none); None = all three (`segmenter.Segmenter`).
        image_limits: what an uploaded image's header may declare (`uploads.UPLOAD_IMAGE_LIMITS`).
        max_decode_ratio: most decoded bytes per uploaded byte (`uploads.MAX_DECODE_RATIO`).
    """

    max_upload_bytes: int = 512 * 1024**2
    body_timeout_s: float = 120.0
    token_sha256: str | None = None
    max_concurrent: int = 1
    max_queued: int = 4
    reload_interval_s: float = 60.0
    docs: bool = False
    device: str | None = None
    threshold: float | None = None
    tta_axes: tuple[int, ...] | None = None
    image_limits: ImageLimits = UPLOAD_IMAGE_LIMITS
    max_decode_ratio: float = MAX_DECODE_RATIO

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ReplicaSettings":
        """The settings from `asdict(settings)`, the plain form the deployment carries to replicas."""
        raw = dict(raw)
        if isinstance(raw.get("image_limits"), dict):
            raw["image_limits"] = ImageLimits(**raw["image_limits"])
        return cls(**raw)

    @property
    def max_ongoing_requests(self) -> int:
        # Room above the prediction queue so that health checks are never queued behind it.
        return self.max_concurrent + self.max_queued + 8


def model_label(model_ref: str) -> str:
    """How /healthz names the model: a registry/run reference as is, a path by its last two
    parts (never the absolute path, which says where the server's files are)."""
    if parse(model_ref).kind != "path":
        return model_ref
    return "/".join(Path(model_ref).parts[-2:])


def _wants_json(request: Request, fmt: str | None) -> bool:
    if fmt:
        if fmt.lower() not in ("json", "nifti", "nii.gz"):
            raise UploadError(400, "format", f"unknown format {fmt!r} (json or nifti)")
        return fmt.lower() == "json"
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "application/gzip" not in accept


@serve.deployment(name="StrokeSegmenter", health_check_period_s=10)
@serve.ingress(app)
class StrokeSegmenter:
    """A replica holding one loaded checkpoint."""

    def __init__(self, model_ref: str = CHAMPION_URI, tracking_uri: str | None = None,
                 settings: dict[str, Any] | None = None):
        self.settings = ReplicaSettings.from_dict(settings or {})
        self.tracking_uri = tracking_uri
        self.segmenter = Segmenter.load(model_ref, tracking_uri=tracking_uri, device=self.settings.device,
                                        threshold=self.settings.threshold, tta_axes=self.settings.tta_axes)
        self.slots = asyncio.Semaphore(self.settings.max_concurrent)
        self.in_flight = 0
        self.reload_lock = asyncio.Lock()
        self.reloader = None
        if self.settings.reload_interval_s > 0 and parse(model_ref).kind == "alias":
            self.reloader = asyncio.get_event_loop().create_task(self._follow_alias())

    # -- helpers

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {VERSION_HEADER: self.segmenter.version, **(extra or {})}

    def _error(self, exc: UploadError) -> JSONResponse:
        body = {"error": str(exc), "field": exc.field or None, "problem": exc.problem}
        return JSONResponse(body, status_code=exc.status, headers=self._headers(exc.headers))

    def _check_token(self, request: Request) -> None:
        if not bearer_matches(request.headers.get("authorization"), self.settings.token_sha256):
            raise UploadError(401, "", "missing or wrong bearer token (Authorization: Bearer <token>)",
                              {"WWW-Authenticate": 'Bearer realm="stroke-ray"'})

    def _segment(self, segmenter: Segmenter, files: dict[str, tuple[str, bytes]]):
        """Validate, segment; returns (mask image on the reference grid, stats)."""
        limits = self.settings.image_limits
        # Every upload's header is checked (and its decoding capped) before load_case reads
        # any of them, so a bomb in the last field costs nothing for the first ones.
        reference = None
        for modality, (_, data) in files.items():
            checked = read_nifti(modality, data, limits, self.settings.max_decode_ratio)
            if modality == segmenter.modalities[0]:
                reference = checked.image
            del checked
        with tempfile.TemporaryDirectory(prefix="stroke-ray-upload-") as tmp:
            paths = {}
            for modality, (_, data) in files.items():
                # The bytes as uploaded (gzip is recognised by content, not by name).
                paths[modality] = Path(tmp) / f"{modality}{NIFTI_SUFFIXES[0]}"
                paths[modality].write_bytes(data)
            try:
                case = load_case(paths, subject="upload", limits=limits)
            except InputFileError as exc:
                field = next((m for m, p in paths.items() if str(p) == exc.path), "")
                raise UploadError(400, field, exc.problem) from None
            except StrokeRayError as exc:
                raise UploadError(400, "", str(exc).replace(tmp + os.sep, "")) from None
        prediction = segmenter.predict(case)
        mask = like_reference(prediction.mask, reference, np.uint8)
        return mask, lesion_stats(prediction.mask, prediction.affine)

    async def _reload(self, force: bool) -> bool:
        """Load the reference again when its version moved (or always, with `force`)."""
        current = self.segmenter
        async with self.reload_lock:
            if not force:
                # A cheap look at the alias first; the weights are fetched only when it moved.
                label = await run_in_threadpool(version_label, current.model_ref, Path(os.devnull), self.tracking_uri)
                if label == current.version:
                    return False
            fresh = await run_in_threadpool(Segmenter.load, current.model_ref, self.tracking_uri,
                                            current.device, current.threshold, current.tta_axes,
                                            current.min_lesion_ml)
            # Fail-safe: a checkpoint for other modalities would break every client.
            if fresh.modalities != current.modalities:
                raise StrokeRayError(f"{current.model_ref} now needs {fresh.modalities}, "
                                     f"not {current.modalities}; deploy it as a new application")
            changed = fresh.version != current.version
            if changed:
                self.segmenter = fresh
                logger.info("model reloaded: %s -> %s", current.version, fresh.version)
            return changed

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self._reload(force=False)
            except Exception:  # noqa: BLE001 - a registry hiccup must not stop the checks
                logger.exception("periodic model check failed; keeping %s", self.segmenter.version)

    # -- routes

    @app.get("/healthz")
    def healthz(self) -> JSONResponse:
        body = {"status": "ok", "model": model_label(self.segmenter.model_ref), "version": self.segmenter.version,
                "modalities": self.segmenter.modalities}
        return JSONResponse(body, headers=self._headers())

    @app.get("/readyz")
    def readyz(self) -> JSONResponse:
        capacity = self.settings.max_concurrent + self.settings.max_queued
        ready = self.in_flight < capacity
        body = {"ready": ready, "version": self.segmenter.version, "in_flight": self.in_flight,
                "capacity": capacity}
        return JSONResponse(body, status_code=200 if ready else 503, headers=self._headers())

    @app.post("/predict")
    async def predict(self, request: Request, format: str | None = None) -> Response:
        capacity = self.settings.max_concurrent + self.settings.max_queued
        try:
            self._check_token(request)
            if self.in_flight >= capacity:
                raise UploadError(503, "", "all prediction slots are busy; retry later", {"Retry-After": "10"})
            as_json = _wants_json(request, format)
        except UploadError as exc:
            return self._error(exc)
        self.in_flight += 1
        try:
            body = await read_body(request, self.settings.max_upload_bytes, self.settings.body_timeout_s)
            segmenter = self.segmenter  # one model for the whole request, even across a reload
            files = await read_form_files(request, body, segmenter.modalities)
            del body
            async with self.slots:
                # The model runs in a thread so the health routes keep answering meanwhile.
                mask, stats = await run_in_threadpool(self._segment, segmenter, files)
        except UploadError as exc:
            return self._error(exc)
        except Exception:  # noqa: BLE001 - report by id, keep the replica serving
            request_id = request.headers.get("x-request-id", "-")
            logger.exception("prediction failed (request id %s)", request_id)
            return JSONResponse({"error": "prediction failed; the server log has the details",
                                 "request_id": request_id}, status_code=500, headers=self._headers())
        finally:
            self.in_flight -= 1
        if as_json:
            body = {**stats, "shape": list(mask.shape), "model_version": segmenter.version}
            return JSONResponse(body, headers=self._headers())
        reference_name = files[segmenter.modalities[0]][0]
        stem = strip_nifti_suffix(reference_name)
        # The client's file name goes into a header: keep only harmless characters.
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:200] or "upload"
        headers = self._headers({
            "Content-Disposition": f'attachment; filename="{stem}_mask.nii.gz"',
            "X-Lesion-Volume-Ml": str(stats["volume_ml"]),
            "X-Lesion-Count": str(stats["lesion_count"]),
        })
        headers[VERSION_HEADER] = segmenter.version
        return Response(nifti_bytes(mask), media_type="application/gzip", headers=headers)

    @app.post("/admin/reload")
    async def reload(self, request: Request) -> JSONResponse:
        try:
            self._check_token(request)
        except UploadError as exc:
            return self._error(exc)
        before = self.segmenter.version
        try:
            changed = await self._reload(force=True)
        except Exception:  # noqa: BLE001 - keep the model being served
            request_id = request.headers.get("x-request-id", "-")
            logger.exception("reload failed (request id %s); keeping %s", request_id, before)
            return JSONResponse({"error": "reload failed; still serving the previous model",
                                 "request_id": request_id, "version": before},
                                status_code=500, headers=self._headers())
        return JSONResponse({"previous": before, "version": self.segmenter.version, "changed": changed},
                            headers=self._headers())

    def _docs_refused(self, request: Request, path: str) -> Response | None:
        """404 while the docs are off, 401 without the token; None when they may be shown."""
        if not self.settings.docs:
            return self._not_found(path)
        try:
            self._check_token(request)
        except UploadError as exc:
            return self._error(exc)
        return None

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> Response:
        return self._docs_refused(request, "openapi.json") or JSONResponse(app.openapi(), headers=self._headers())

    @app.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> Response:
        refused = self._docs_refused(request, "docs")
        if refused is not None:
            return refused
        page = get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                                   title="stroke-ray")
        return HTMLResponse(page.body, headers=self._headers())

    def _not_found(self, path: str) -> JSONResponse:
        return JSONResponse({"error": f"no route /{path}; use POST /predict, GET /healthz or GET /readyz"},
                            status_code=404, headers=self._headers())

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def not_found(self, path: str, request: Request) -> JSONResponse:
        # Catch-all so that unknown routes also carry the model version header.
        known = {"healthz": "GET", "readyz": "GET", "predict": "POST", "admin/reload": "POST"}
        if path in known:
            return JSONResponse({"error": f"/{path} accepts {known[path]} only"}, status_code=405,
                                headers=self._headers({"Allow": known[path]}))
        return self._not_found(path)


def build_app(
    model_ref: str | Path = CHAMPION_URI,
    *,
    tracking_uri: str | None = None,
    settings: ReplicaSettings = ReplicaSettings(),
    num_replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float = 2.0,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
):
    """The bound Serve application: fixed replicas, or autoscaling when min/max are given."""
    ref = str(model_ref)
    local = Path(ref).expanduser()
    if local.exists():
        # Replicas have their own working directory; give them an absolute path.
        ref = absolute(local)
    elif tracking_uri is None:
        # Resolved here, in the caller's directory, not in the replica's.
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "max_ongoing_requests": settings.max_ongoing_requests,
    }
    if min_replicas is not None or max_replicas is not None:
        low = 1 if min_replicas is None else int(min_replicas)
        high = max(low, 1 if max_replicas is None else int(max_replicas))
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            "target_ongoing_requests": target_ongoing_requests,
        }
    else:
        options["num_replicas"] = int(num_replicas)
    if settings.device is None and gpus_per_replica <= 0:
        settings = replace(settings, device="cpu")
    return StrokeSegmenter.options(**options).bind(ref, tracking_uri, asdict(settings))
