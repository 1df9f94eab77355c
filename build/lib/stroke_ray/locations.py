"""Local paths and URLs: every path argument of stroke-ray goes through `absolute`.

A location is either a local path or a URL (`s3://bucket/x`, `gs://...`, `memory://...`,
`file:///...`). Ray workers, Tune trials and Serve replicas run in working directories of
their own, so a local path is made absolute where the user gives it; a URL is kept as it is
(turning it into a `Path` would silently make `s3://b/x` a local folder `s3:/b/x`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["absolute", "exists", "is_url", "join", "local_or_url"]


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


def exists(location: str | Path) -> bool:
    """Whether a local path exists; a URL is assumed to (checking costs a round trip)."""
    return is_url(location) or Path(location).exists()
