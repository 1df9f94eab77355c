"""Local paths and URLs: every path argument of stroke-ray goes through `absolute`.

A location is either a local path or a URL (`s3://bucket/x`, `gs://...`, `memory://...`,
`file:///...`). Ray workers, Tune trials and Serve replicas run in working directories of
their own, so a local path is made absolute where the user gives it; a URL is kept as it is
(turning it into a `Path` would silently make `s3://b/x` a local folder `s3:/b/x`).

Files a sweep writes beside Ray Tune's own state (`best/`, `report.md`) are read and
written through `filesystem`, the same pyarrow filesystems Ray Train and Tune use for
`storage_path`, so they land wherever Tune's state does, with the same credentials and
endpoint (`AWS_ENDPOINT_URL` for an S3-compatible server; see docs/cluster.md).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from stroke_ray.errors import StrokeRayError
from stroke_ray.files import atomic_write_bytes

__all__ = [
    "absolute",
    "exists",
    "filesystem",
    "found",
    "is_url",
    "join",
    "list_names",
    "local_or_url",
    "make_folder",
    "read_bytes",
    "size_of",
    "storage_uri",
    "write_bytes",
    "write_text",
]


def is_url(location: str | Path) -> bool:
    """Whether `location` is a URL (`scheme://...`) rather than a local path."""
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A local path made absolute (`~` expanded, symlinks resolved); a URL unchanged.

    Args:
        location: a local path (relative or absolute) or a URL.
    """
    if is_url(location):
        return str(location)
    return str(Path(location).expanduser().resolve())


def local_or_url(location: str | Path) -> str:
    """`file://` URLs become plain paths (for zarr's LocalStore); anything else unchanged."""
    location = str(location)
    return location[len("file://"):] if location.startswith("file://") else location


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a local path or a URL (URLs joined with '/')."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location).joinpath(*parts))


def make_folder(location: str | Path) -> None:
    """Create a local output folder (and its parents) now, so that one that cannot be made
    is one clear line before any work starts; a URL is left to its filesystem.

    Raises:
        StrokeRayError: the path is a file, or the folder cannot be created.
    """
    if is_url(location):
        return
    path = Path(local_or_url(str(location)))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StrokeRayError(f"{location}: exists and is not a folder") from None
    except OSError as exc:
        raise StrokeRayError(f"{location}: cannot create the folder ({exc.strerror or exc})") from None


def exists(location: str | Path) -> bool:
    """Whether a local path exists; a URL is assumed to (checking costs a round trip)."""
    return is_url(location) or Path(location).exists()


def storage_uri(storage: str | Path, path: str) -> str:
    """A path Ray reports inside `storage`'s filesystem, as a location of its own.

    Ray Train reports checkpoints by their path inside the storage filesystem
    (`bucket/runs/...` for `s3://bucket/runs`): the storage's scheme is put back.
    """
    if is_url(storage) and not is_url(path):
        return f"{str(storage).split('://', 1)[0]}://{path.lstrip('/')}"
    return path


# --- files beside Ray's own state (pyarrow filesystems, as Ray Train and Tune use) ----------


def filesystem(location: str | Path):
    """(pyarrow filesystem, path inside it) for a local path or a URL."""
    import pyarrow.fs  # heavy; only sweeps touch it

    location = local_or_url(location)
    if is_url(location):
        return pyarrow.fs.FileSystem.from_uri(str(location))
    return pyarrow.fs.LocalFileSystem(), absolute(location)


def found(location: str | Path) -> bool:
    """Whether a file or folder is at `location`, asking the object store for a URL."""
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def size_of(location: str | Path) -> int | None:
    """A file's size in bytes, or None when there is no file at `location`."""
    import pyarrow.fs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pyarrow.fs.FileType.File else None


def list_names(location: str | Path) -> list[str]:
    """Names of the entries directly inside a folder (empty if there is none), sorted."""
    import pyarrow.fs

    fs, path = filesystem(location)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in fs.get_file_info(selector))


def read_bytes(location: str | Path) -> bytes:
    """A file's bytes, local or from an object store.

    Raises:
        FileNotFoundError: nothing at `location`.
    """
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a file whole or not at all: locally through a temporary name and a rename
    (`files.atomic_write_bytes`), on an object store as one PUT (atomic there)."""
    location = local_or_url(location)
    if not is_url(location):
        atomic_write_bytes(Path(location), data)
        return
    fs, path = filesystem(location)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str | Path, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(location, text.encode("utf-8"))
