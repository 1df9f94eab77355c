"""Files written whole or not at all, NIfTI file names and the checkpoint's file name.

Every file stroke-ray writes for a user (masks, tables, checkpoints, reports, synthetic
cases) goes through `atomic_write_bytes` / `atomic_write_text` or `atomic_path`: the data is
written to a hidden temporary name in the same folder, flushed to disk, and renamed over the
target, so a reader (or a crash) sees the old file or the whole new one, never a partial
write. The temporary name is hidden and ends in `.part`, so dataset discovery never mistakes
it for an image.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "CHECKPOINT_FILE",
    "NIFTI_SUFFIXES",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_nifti",
    "strip_nifti_suffix",
]

# The one file a saved model is (checkpoint.py writes it). It is named here, in a module
# without heavy imports, so that model_ref can use it without loading torch.
CHECKPOINT_FILE = "checkpoint.pt"

# Longest first, so ".nii.gz" is recognised before ".nii".
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(name: str | Path) -> bool:
    """Whether a file name ends in .nii or .nii.gz."""
    return str(name).endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str | Path) -> str:
    """The file name without its .nii / .nii.gz suffix (other names are returned unchanged).

    Args:
        name: a file name or path; only its last component is used.
    """
    base = Path(str(name)).name
    for suffix in NIFTI_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed onto `path` when the block ends without error.

    For writers that want a file name rather than bytes (`torch.save`, `shutil.copyfile`,
    pickling). The file is fsynced before the rename, which is atomic on POSIX and
    Windows. On an exception the temporary file is removed and `path` is left as it was.

    Args:
        path: the file to create or replace; its folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary name, fsync, rename); returns `path`.

    Args:
        path: the file to create or replace; its folder is created if needed.
        data: the whole content.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; see `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))
