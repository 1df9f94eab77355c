"""Reading a prediction upload: the body within limits, the multipart form, each NIfTI file.

Every problem is an `UploadError` carrying the HTTP status and one line naming the form
field and the problem; the service answers it as JSON and keeps serving.
"""

# No `from __future__ import annotations`: FastAPI/Starlette types are used at run time.
import asyncio
from typing import Any

from starlette.requests import Request

from stroke_ray.errors import InputFileError
from stroke_ray.nifti import ImageLimits, read_nifti_bytes

__all__ = ["MAX_DECODE_RATIO", "UPLOAD_IMAGE_LIMITS", "UploadError", "read_body", "read_form_files", "read_nifti"]

# What one uploaded image may declare by default (`stroke-ray serve --max-dim,
# --max-image-gib, --voxel-range-mm` change it): up to 1024 voxels per axis and 256 MiB
# decoded (the ISLES'22 FLAIR, 512 x 512 x 29 float32, is 29 MiB; a 1 mm 256^3 float64
# volume 128 MiB). Smaller than convert's and predict's 2 GiB: these images come from
# clients the server does not control, and a replica holds every image of a request (and
# of each concurrent request) in memory at once, beside the model.
UPLOAD_IMAGE_LIMITS = ImageLimits(max_dim=1024, max_decoded_bytes=256 * 1024**2)
# Decoded size over upload size (`stroke-ray serve --max-decode-ratio`); the real ISLES'22
# images are 4-14x, a plain .nii is 1x.
MAX_DECODE_RATIO = 200.0


class UploadError(Exception):
    """A client mistake: answered with `status` and one line naming the field and problem."""

    def __init__(self, status: int, field: str, problem: str, headers: dict[str, str] | None = None):
        self.status, self.field, self.problem = status, field, problem
        self.headers = headers or {}
        super().__init__(f"{field}: {problem}" if field else problem)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes and with 408
    when it has not fully arrived after `timeout_s` seconds.

    Behind the proxy guard (http_guard) the body is complete before the replica sees the
    request; this is the same check again for a proxy without the guard.

    Raises:
        UploadError: 413 (too large), 408 (too slow).
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, "", f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")

    async def collect() -> bytes:
        body = bytearray()
        # Counted while reading too: Content-Length can be absent (chunked) or wrong.
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise UploadError(413, "", f"request body exceeds the limit of {limit} bytes")
        return bytes(body)

    try:
        return await asyncio.wait_for(collect(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise UploadError(408, "", f"request body not received within {timeout_s:g} s") from None


async def read_form_files(request: Request, body: bytes, needed: list[str]) -> dict[str, tuple[str, bytes]]:
    """{modality: (filename, bytes)} from a multipart body, for every modality in `needed`.

    Raises:
        UploadError: 400 (not multipart, malformed, a text field), 422 (a modality missing).
    """
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(400, "", "expected a multipart/form-data upload with one file field per modality")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=32, max_fields=32)
    except Exception:  # noqa: BLE001 - malformed multipart bodies
        raise UploadError(400, "", "malformed multipart body") from None
    try:
        missing = [m for m in needed if m not in form]
        if missing:
            raise UploadError(422, missing[0],
                              f"missing file field(s) {', '.join(missing)}; the model needs {', '.join(needed)}")
        files = {}
        for modality in needed:
            item = form[modality]
            if isinstance(item, str):
                raise UploadError(400, modality, "expected a file upload, got a text field")
            files[modality] = (item.filename or f"{modality}.nii.gz", await item.read())
        return files
    finally:
        await form.close()


def read_nifti(field: str, data: bytes, limits: ImageLimits, max_ratio: float = MAX_DECODE_RATIO):
    """Check one uploaded .nii / .nii.gz header first, then decode it under a hard cap.

    The header may declare at most `limits.max_decoded_bytes` and at most `max_ratio` times
    the upload's own size (real MRI compresses 4-14x; a small file that promises a huge
    volume is a decompression bomb): either is refused with 413 before any voxel is
    decoded (`nifti.read_nifti_bytes`). Any other problem is a 400 naming the field.

    Args:
        field: the form field, named in errors.
        data: the uploaded bytes.
        limits: what the header may declare (the service's, `ReplicaSettings.image_limits`).
        max_ratio: most decoded bytes per uploaded byte.

    Returns:
        nifti.NiftiRead of the upload.

    Raises:
        UploadError: 400 (empty, not NIfTI, not 3D, truncated, no orientation, ...), 413.
    """
    if not data:
        raise UploadError(400, field, "empty file")
    cap = min(limits.max_decoded_bytes, max(1024, int(max_ratio * len(data))))
    capped = ImageLimits(max_dim=limits.max_dim, max_decoded_bytes=cap, min_voxel_mm=limits.min_voxel_mm,
                         max_voxel_mm=limits.max_voxel_mm)
    try:
        return read_nifti_bytes(data, field, capped)
    except InputFileError as exc:
        # check_header words a size refusal as "... decodes to X, more than the limit of Y".
        if "decodes to" in exc.problem:
            ratio = f" or {max_ratio:g}x the upload's {len(data)} bytes" if cap < limits.max_decoded_bytes else ""
            raise UploadError(413, field, f"{exc.problem.split(', more than')[0]}: more than the limit of "
                                          f"{limits.max_decoded_bytes} bytes per image{ratio}") from None
        raise UploadError(400, field, exc.problem) from None
