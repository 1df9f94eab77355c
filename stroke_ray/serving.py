"""HTTP lesion segmentation on Ray Serve.

One deployment (`StrokeSegmenter`, a FastAPI ingress) holds a checkpoint loaded with
`weights_only=True` (the registered champion by default) and answers:

    POST /predict      multipart upload, one file field per modality of the model
                       (e.g. dwi, adc, flair; .nii or .nii.gz) -> the mask as .nii.gz on the
                       uploaded reference modality's grid, or JSON with ?format=json /
                       Accept: application/json
    GET  /healthz      {"status": "ok", "model": ..., "version": ...}

Every response carries `X-Model-Version`. A bad upload gets one 4xx naming the field and
the problem (missing modality 422, not NIfTI / corrupt gzip / wrong dimensionality 400,
too large 413) and never takes the replica down. Uploads go through the same
`ingest.load_case` and `inference.predict_case` as batch prediction (`predict.Segmenter`),
so HTTP and `stroke-ray predict` give the same masks.

Ray Serve is used rather than a bare uvicorn process because it gives replicas,
request-driven autoscaling and GPU placement on the same Ray cluster that trains the
models, with no extra infrastructure.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on
# the route signatures after Serve has pickled the app.
import gzip
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from stroke_ray.errors import InputFileError, StrokeRayError
from stroke_ray.files import strip_nifti_suffix
from stroke_ray.ingest import load_case
from stroke_ray.locations import absolute
from stroke_ray.model_ref import CHAMPION_URI, resolve_checkpoint
from stroke_ray.predict import (
    Segmenter,
    lesion_stats,
    like_reference,
    nifti_bytes,
)
from stroke_ray.raycluster import connect
from stroke_ray.tracking import default_tracking_uri

__all__ = [
    "DEFAULT_APP_NAME",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "VERSION_HEADER",
    "app",
    "build_app",
    "read_nifti",
    "start_server",
    "stop_server",
    "StrokeSegmenter",
    "UploadError",
]

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024**2
DEFAULT_APP_NAME = "stroke-ray"
VERSION_HEADER = "X-Model-Version"
_GZIP_MAGIC = b"\x1f\x8b"

app = FastAPI(
    title="stroke-ray",
    description="3D ischemic-stroke lesion segmentation of MRI volumes.",
    docs_url="/docs",
)


class UploadError(Exception):
    """A client mistake: answered with `status` and one line naming the field and problem."""

    def __init__(self, status: int, field: str, problem: str):
        self.status, self.field, self.problem = status, field, problem
        super().__init__(f"{field}: {problem}" if field else problem)


def read_nifti(field: str, data: bytes):
    """Parse one uploaded .nii / .nii.gz; UploadError (400) names the field on any problem.

    Returns (image, uncompressed bytes). The whole voxel array is touched here, so a file
    cut short fails now, with its field name, rather than deep inside resampling.
    """
    import nibabel as nib

    if not data:
        raise UploadError(400, field, "empty file")
    raw = data
    if data[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise UploadError(400, field, f"truncated or corrupt gzip data ({exc})") from None
    klass = nib.Nifti2Image if raw[:4] == (540).to_bytes(4, "little") else nib.Nifti1Image
    try:
        image = klass.from_bytes(raw)
    except Exception:  # noqa: BLE001 - nibabel raises many types for a non-NIfTI file
        raise UploadError(400, field, "not a NIfTI file (expected .nii or .nii.gz)") from None
    shape = tuple(int(s) for s in image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise UploadError(400, field, f"expected a 3D volume, got shape {shape}")
    if min(shape[:3]) < 2:
        raise UploadError(400, field, f"expected a 3D volume, got shape {shape}")
    try:
        np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001
        raise UploadError(400, field, f"truncated image data ({exc})") from None
    return image, raw


def _wants_json(request: Request, fmt: str | None) -> bool:
    if fmt:
        if fmt.lower() not in ("json", "nifti", "nii.gz"):
            raise UploadError(400, "format", f"unknown format {fmt!r} (json or nifti)")
        return fmt.lower() == "json"
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "application/gzip" not in accept


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, "", f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    # Counted while reading too: Content-Length can be absent (chunked) or wrong.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadError(413, "", f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


@serve.deployment(name="StrokeSegmenter", max_ongoing_requests=4, health_check_period_s=10)
@serve.ingress(app)
class StrokeSegmenter:
    """A replica holding one loaded checkpoint."""

    def __init__(
        self,
        model_ref: str = CHAMPION_URI,
        tracking_uri: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        device: str | None = None,
        threshold: float = 0.5,
    ):
        self.segmenter = Segmenter.load(model_ref, tracking_uri=tracking_uri, device=device, threshold=threshold)
        self.max_upload_bytes = int(max_upload_bytes)

    # -- helpers

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {VERSION_HEADER: self.segmenter.version, **(extra or {})}

    def _error(self, exc: UploadError) -> JSONResponse:
        body = {"error": str(exc), "field": exc.field or None, "problem": exc.problem}
        return JSONResponse(body, status_code=exc.status, headers=self._headers())

    async def _uploads(self, request: Request) -> dict[str, tuple[str, bytes]]:
        """{modality: (filename, bytes)} for every modality the model needs."""
        from starlette.requests import Request as StarletteRequest

        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise UploadError(400, "", "expected a multipart/form-data upload with one file field per modality")
        body = await _read_body(request, self.max_upload_bytes)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, receive).form(max_files=32, max_fields=32)
        except Exception as exc:  # noqa: BLE001 - malformed multipart bodies
            raise UploadError(400, "", f"malformed multipart body ({exc})") from None
        try:
            needed = self.segmenter.modalities
            missing = [m for m in needed if m not in form]
            if missing:
                raise UploadError(
                    422, missing[0], f"missing file field(s) {', '.join(missing)}; the model needs {', '.join(needed)}"
                )
            files = {}
            for modality in needed:
                item = form[modality]
                if isinstance(item, str):
                    raise UploadError(400, modality, "expected a file upload, got a text field")
                files[modality] = (item.filename or f"{modality}.nii.gz", await item.read())
            return files
        finally:
            await form.close()

    def _segment(self, files: dict[str, tuple[str, bytes]]):
        """Validate, segment; returns (mask image on the reference grid, stats)."""
        modalities = self.segmenter.modalities
        images = {m: read_nifti(m, data) for m, (_, data) in files.items()}
        with tempfile.TemporaryDirectory(prefix="stroke-ray-upload-") as tmp:
            paths = {}
            for modality, (_, raw) in images.items():
                paths[modality] = Path(tmp) / f"{modality}.nii"
                paths[modality].write_bytes(raw)
            try:
                case = load_case(paths, subject="upload")
            except InputFileError as exc:
                field = next((m for m, p in paths.items() if str(p) == exc.path), "")
                raise UploadError(400, field, exc.problem) from None
            except StrokeRayError as exc:
                raise UploadError(400, "", str(exc).replace(tmp + os.sep, "")) from None
        prediction = self.segmenter.predict(case)
        reference = images[modalities[0]][0]
        mask = like_reference(prediction.mask, reference, np.uint8)
        return mask, lesion_stats(prediction.mask, prediction.affine)

    # -- routes

    @app.get("/healthz")
    def healthz(self) -> JSONResponse:
        body = {"status": "ok", "model": self.segmenter.model_ref, "version": self.segmenter.version,
                "modalities": self.segmenter.modalities}
        return JSONResponse(body, headers=self._headers())

    @app.post("/predict")
    async def predict(self, request: Request, format: str | None = None) -> Response:
        from starlette.concurrency import run_in_threadpool

        try:
            as_json = _wants_json(request, format)
            files = await self._uploads(request)
            # The model runs in a thread so /healthz keeps answering during a prediction.
            mask, stats = await run_in_threadpool(self._segment, files)
        except UploadError as exc:
            return self._error(exc)
        except Exception as exc:  # noqa: BLE001 - report, keep the replica serving
            return JSONResponse({"error": f"prediction failed: {type(exc).__name__}: {exc}"},
                                status_code=500, headers=self._headers())
        if as_json:
            body = {**stats, "shape": list(mask.shape), "model_version": self.segmenter.version}
            return JSONResponse(body, headers=self._headers())
        reference_name = files[self.segmenter.modalities[0]][0]
        stem = strip_nifti_suffix(reference_name)
        # The client's file name goes into a header: keep only harmless characters.
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:200] or "upload"
        headers = self._headers({
            "Content-Disposition": f'attachment; filename="{stem}_mask.nii.gz"',
            "X-Lesion-Volume-Ml": str(stats["volume_ml"]),
            "X-Lesion-Count": str(stats["lesion_count"]),
        })
        return Response(nifti_bytes(mask), media_type="application/gzip", headers=headers)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def not_found(self, path: str, request: Request) -> JSONResponse:
        # Catch-all so that unknown routes also carry the model version header.
        known = {"healthz": "GET", "predict": "POST"}
        if path in known:
            return JSONResponse({"error": f"/{path} accepts {known[path]} only"}, status_code=405,
                                headers=self._headers({"Allow": known[path]}))
        return JSONResponse({"error": f"no route /{path}; use POST /predict or GET /healthz"},
                            status_code=404, headers=self._headers())


def build_app(
    model_ref: str | Path = CHAMPION_URI,
    *,
    tracking_uri: str | None = None,
    num_replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float = 2.0,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    device: str | None = None,
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
    if device is None and gpus_per_replica <= 0:
        device = "cpu"
    return StrokeSegmenter.options(**options).bind(ref, tracking_uri, int(max_upload_bytes), device)


def start_server(
    model_ref: str | Path = CHAMPION_URI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
    **app_options: Any,
) -> str:
    """Deploy the service on Ray (local, or the cluster at `address`) and return its URL.

    Returns once the replicas answer. `app_options` go to `build_app` (replicas,
    autoscaling, GPUs, upload limit, tracking URI).
    """

    # Fail here, with one clear line, rather than in a replica that retries.
    resolve_checkpoint(model_ref, app_options.get("tracking_uri"))
    connect(address)
    serve.start(http_options={"host": host, "port": int(port)})
    application = build_app(model_ref, **app_options)
    serve.run(application, name=name, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{int(port)}{route_prefix.rstrip('/')}"


def stop_server() -> None:
    """Shut Serve down (the replicas, proxies and controller); Ray itself keeps running."""
    serve.shutdown()
