"""Header-first NIfTI reading with bounded memory: the one way stroke-ray opens an image.

Every image (a dataset file in `convert` and `predict`, an upload in `serve`) goes through
the same three steps:

1. The header is parsed from the first bytes (a gzip stream is decompressed only as far as
   the header) and checked against `ImageLimits` by `check_header`: a 3D volume (trailing
   singleton axes are fine), at most `max_dim` voxels per axis, at most
   `max_decoded_bytes` of decoded stream, a known orientation (qform_code or sform_code
   above 0), voxel sizes within [`min_voxel_mm`, `max_voxel_mm`].
2. Only then is the rest decoded, with a hard cap at the size the header promises
   (vox_offset + voxel bytes): a stream that ends early is truncated, a stream that decodes
   to more is refused at its first extra byte. Memory therefore never exceeds what the
   limits allow, whatever the file holds (a gzip bomb decodes no further than its header's
   promise). `stream_decoder.StreamDecoder` does the capping.
3. The voxel array is a view of the decode buffer (scaled to float32 when the header has a
   slope or intercept), so an image costs its decoded size once.

Every problem is an `InputFileError(source, problem)`: one line naming the file (or upload
field) and what is wrong. Values (NaN, inf, all-zero images) are checked by the caller
(`ingest.load_case`), which knows what the image is for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from stroke_ray.errors import ConfigError, InputFileError
from stroke_ray.grid import spacing_of
from stroke_ray.stream_decoder import StreamDecoder

__all__ = [
    "GIB",
    "ImageLimits",
    "HeaderInfo",
    "NiftiRead",
    "check_header",
    "read_nifti_file",
    "read_nifti_bytes",
]

GIB = 1024**3
# Raw input is fed to the decoder in pieces of this size.
_CHUNK = 1 << 20
# sizeof_hdr of NIfTI-1 and NIfTI-2 headers; the 4 bytes after the header are the
# extension flag, so the image data can start no earlier than this.
_HEADER_SIZES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
_SINGLE_FILE_MAGIC = {b"n+1", b"n+2"}


@dataclass(frozen=True)
class ImageLimits:
    """What a NIfTI header may declare before any voxel is decoded.

    Defaults fit real MRI (the ISLES'22 FLAIR is 512 x 512 x 29 at 0.45 x 0.45 x 5 mm, a 7T
    scan at 0.2 mm is under 1024 per axis) and bound one image's memory to a few GiB.

    Raises:
        ConfigError: a limit that is not positive, or a voxel range with min > max.
    """

    max_dim: int = 1024
    max_decoded_bytes: int = 2 * GIB
    min_voxel_mm: float = 0.1
    max_voxel_mm: float = 20.0

    def __post_init__(self) -> None:
        # The one validation point for every command that takes these limits.
        if int(self.max_dim) < 1:
            raise ConfigError(f"max_dim must be at least 1, got {self.max_dim}")
        if int(self.max_decoded_bytes) < 1024:
            raise ConfigError(f"max_decoded_bytes must be at least 1024, got {self.max_decoded_bytes}")
        if not (0 < float(self.min_voxel_mm) <= float(self.max_voxel_mm) < float("inf")):
            raise ConfigError(
                f"voxel size range must satisfy 0 < min <= max, got {self.min_voxel_mm}-{self.max_voxel_mm} mm"
            )

    @classmethod
    def from_cli(cls, max_dim: int, max_image_gib: float, voxel_range_mm: str) -> "ImageLimits":
        """Limits from the command-line options `--max-dim`, `--max-image-gib`, `--voxel-range-mm`.

        Raises:
            ConfigError: a value that does not parse or is out of range.
        """
        try:
            low, high = (float(x) for x in voxel_range_mm.replace(":", ",").split(","))
        except ValueError:
            raise ConfigError(f"--voxel-range-mm must be MIN,MAX in mm (e.g. 0.1,20), got {voxel_range_mm!r}") from None
        return cls(max_dim=max_dim, max_decoded_bytes=int(max_image_gib * GIB), min_voxel_mm=low, max_voxel_mm=high)


@dataclass(frozen=True)
class HeaderInfo:
    """What a checked header promises."""

    header: nib.Nifti1Header  # or Nifti2Header
    shape: tuple[int, ...]  # as declared (may have trailing singleton axes)
    dtype: np.dtype  # on-disk voxel type
    vox_offset: int  # where the voxels start in the decoded stream
    data_bytes: int  # bytes of voxel data
    affine: np.ndarray  # float64 4x4, the header's best affine (sform, else qform)
    affine_problem: str | None  # set only when the caller allowed a bad affine

    @property
    def decoded_bytes(self) -> int:
        """The exact length of the decoded stream: header, extensions, voxels."""
        return self.vox_offset + self.data_bytes


@dataclass
class NiftiRead:
    """An image read through the header-first checks."""

    source: str
    image: nib.Nifti1Image  # the stored header; dataobj is the loaded array
    data: np.ndarray  # 3D voxels (trailing singleton axes dropped), scaled if the header says so
    affine: np.ndarray  # float64 4x4
    on_disk_dtype: str
    sha256: str | None  # of the bytes as given (compressed), when asked for
    affine_problem: str | None


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB" if n >= GIB / 10 else f"{n / 1024**2:.3g} MiB"


def _affine_problem(affine: np.ndarray, limits: ImageLimits) -> str | None:
    if not np.all(np.isfinite(affine)):
        return "degenerate affine (non-finite values in the voxel-to-world matrix)"
    spacing = spacing_of(affine)
    if np.any(spacing < 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9 * float(np.prod(spacing)):
        return "degenerate affine (singular voxel-to-world matrix, e.g. a zero voxel size)"
    if np.any(spacing < limits.min_voxel_mm) or np.any(spacing > limits.max_voxel_mm):
        size = " x ".join(f"{s:.4g}" for s in spacing)
        return (f"voxel size {size} mm is outside the allowed {limits.min_voxel_mm:g}-"
                f"{limits.max_voxel_mm:g} mm (wrong units or header?)")
    return None


def check_header(
    header: nib.Nifti1Header,
    source: str | Path,
    limits: ImageLimits = ImageLimits(),
    allow_bad_affine: bool = False,
) -> HeaderInfo:
    """Check a parsed header against `limits`; nothing of the voxel data is needed.

    Args:
        header: a NIfTI-1 or NIfTI-2 header.
        source: the file or upload field named in errors.
        limits: dimension, size and voxel-size limits.
        allow_bad_affine: report a degenerate affine or out-of-range voxel size in
            `HeaderInfo.affine_problem` instead of raising (masks: the caller words it).

    Raises:
        InputFileError: not a single-file NIfTI, not 3D, too large, unsupported voxel type,
            no orientation, or (unless allowed) a degenerate affine or voxel size.
    """
    magic = bytes(np.asarray(header["magic"]).tobytes()).rstrip(b"\0")
    if magic not in _SINGLE_FILE_MAGIC:
        raise InputFileError(source, f"not a single-file NIfTI image (magic {magic!r}; .hdr/.img pairs are not read)")
    shape = tuple(int(s) for s in header.get_data_shape())
    if any(s < 1 for s in shape) or not shape:
        raise InputFileError(source, f"empty image of shape {shape}")
    spatial = shape[:3]
    extra = shape[3:]
    if len(shape) < 3:
        raise InputFileError(source, f"{len(shape)}D image of shape {shape}; a 3D volume is expected")
    if any(s != 1 for s in extra):
        if len(shape) == 4:
            raise InputFileError(source, f"4D image with {shape[3]} volumes; a 3D volume is expected")
        raise InputFileError(source, f"{len(shape)}D image of shape {shape}; a 3D volume is expected")
    if max(spatial) > limits.max_dim:
        raise InputFileError(
            source, f"image of shape {spatial} is larger than the limit of {limits.max_dim} voxels per axis"
        )
    dtype = np.dtype(header.get_data_dtype())
    if dtype.kind not in "biuf":
        raise InputFileError(source, f"unsupported voxel type {dtype}")
    data_bytes = int(np.prod(spatial, dtype=np.int64)) * dtype.itemsize
    # 0 means "right after the header" (nibabel reads it so); anything else below that
    # would put the voxels inside the header.
    vox_offset = int(header.get_data_offset()) or header.sizeof_hdr + 4
    if vox_offset < header.sizeof_hdr + 4:
        raise InputFileError(source, f"voxel data offset {vox_offset} lies inside the header")
    if vox_offset + data_bytes > limits.max_decoded_bytes:
        raise InputFileError(
            source,
            f"image of shape {spatial} ({dtype}) decodes to {_gib(vox_offset + data_bytes)}, more than "
            f"the limit of {_gib(limits.max_decoded_bytes)} per image",
        )
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise InputFileError(
            source, "no orientation: qform_code and sform_code are both 0, so where the voxels lie is unknown"
        )
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    problem = _affine_problem(affine, limits)
    if problem and not allow_bad_affine:
        raise InputFileError(source, problem)
    return HeaderInfo(header, shape, dtype, vox_offset, data_bytes, affine, problem)


def _parse_header(decoder: StreamDecoder, source: str) -> tuple[nib.Nifti1Header, int]:
    head = bytearray(4)
    if decoder.read_into(memoryview(head)) < 4:
        empty = decoder.decoded == 0 and not decoder.gzipped
        raise InputFileError(source, "empty file" if empty else "not a readable NIfTI image (shorter than a header)")
    size = int.from_bytes(head, "little")
    if size not in _HEADER_SIZES:
        size = int.from_bytes(head, "big")
    if size not in _HEADER_SIZES:
        kind = "gzip stream" if decoder.gzipped else "file"
        raise InputFileError(source, f"not a readable NIfTI image (the {kind} does not start with a NIfTI-1 or NIfTI-2 header)")
    block = bytearray(size)
    block[:4] = head
    if decoder.read_into(memoryview(block)[4:]) < size - 4:
        raise InputFileError(source, "truncated NIfTI header")
    try:
        header = _HEADER_SIZES[size](binaryblock=bytes(block), check=True)
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a bad header
        raise InputFileError(source, f"not a readable NIfTI header ({type(exc).__name__}: {exc})") from None
    return header, size


def _read(chunks: Iterator[bytes], source: str, limits: ImageLimits, allow_bad_affine: bool,
          digest: "hashlib._Hash | None") -> NiftiRead:
    decoder = StreamDecoder(chunks, source, digest)
    header, header_size = _parse_header(decoder, source)
    info = check_header(header, source, limits, allow_bad_affine=allow_bad_affine)
    # Extensions between the header and the voxels are decoded and dropped: they are
    # inside the promised size but nothing here needs them.
    decoder.skip(info.vox_offset - header_size)
    # np.empty maps pages lazily: a stream that ends early has only touched what it wrote.
    buffer = np.empty(info.data_bytes, np.uint8)
    decoder.read_into(memoryview(buffer))
    if decoder.decoded < info.decoded_bytes:
        raise InputFileError(
            source, f"truncated image data: the stream ends after {decoder.decoded} of the "
                    f"{info.decoded_bytes} bytes its header promises"
        )
    if not decoder.at_end():
        if decoder.cut:
            raise InputFileError(source, "truncated gzip stream: its end marker and checksum are missing")
        raise InputFileError(
            source, f"image data is longer than the {info.decoded_bytes} bytes its header promises "
                    "(corrupt header or a decompression bomb)"
        )
    data = buffer.view(info.dtype).reshape(info.shape, order="F")
    slope, inter = header.get_slope_inter()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        scaled = data.astype(np.float64 if info.dtype == np.float64 else np.float32)
        del data, buffer
        with np.errstate(over="ignore", invalid="ignore"):
            scaled *= slope
            scaled += inter or 0
        data = scaled
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = klass(data, info.affine, header=header)
    volume = data.reshape(info.shape[:3], order="F")
    return NiftiRead(
        source=source,
        image=image,
        data=volume,
        affine=info.affine,
        on_disk_dtype=str(info.dtype),
        sha256=digest.hexdigest() if digest is not None else None,
        affine_problem=info.affine_problem,
    )


def read_nifti_file(
    path: str | Path,
    limits: ImageLimits = ImageLimits(),
    allow_bad_affine: bool = False,
    checksum: bool = True,
) -> NiftiRead:
    """Read a .nii or .nii.gz file header first, then its voxels under a hard size cap.

    Args:
        path: the file; gzip is recognised by content, not by name.
        limits: what the header may declare.
        allow_bad_affine: see `check_header`.
        checksum: also return the SHA-256 of the file's bytes (computed during the read).

    Raises:
        InputFileError: missing or unreadable file, a header that fails `check_header`,
            truncated, corrupt or oversized data.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file does not exist")
    if not path.is_file():
        raise InputFileError(path, "not a file")
    digest = hashlib.sha256() if checksum else None
    try:
        with open(path, "rb") as fh:
            return _read(iter(lambda: fh.read(_CHUNK), b""), str(path), limits, allow_bad_affine, digest)
    except OSError as exc:
        raise InputFileError(path, f"cannot read the file ({exc.strerror or exc})") from None


def read_nifti_bytes(
    data: bytes,
    source: str,
    limits: ImageLimits = ImageLimits(),
    allow_bad_affine: bool = False,
    checksum: bool = False,
) -> NiftiRead:
    """Read an uploaded .nii or .nii.gz held in memory, header first, under a hard size cap.

    Args:
        data: the uploaded bytes (not copied; a plain .nii is read through them in pieces).
        source: the name errors give (e.g. the upload's form field).
        limits: what the header may declare.
        allow_bad_affine: see `check_header`.
        checksum: also return the SHA-256 of `data`.

    Raises:
        InputFileError: as `read_nifti_file`, naming `source`.
    """
    view = memoryview(data)
    chunks = (view[i:i + _CHUNK] for i in range(0, len(view), _CHUNK))
    return _read(chunks, source, limits, allow_bad_affine, hashlib.sha256() if checksum else None)
