"""Where a command may write: folders it made itself, never over its own inputs.

`claim_folder` lets `synth` and `export-nnunet` write only into a new or empty folder, or
one holding their marker file (written first, so an interrupted run can resume);
`check_apart` keeps `predict` from writing into a folder that holds any of its inputs.
Paths are compared after resolving symbolic links, so another spelling of the same folder
is caught too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from stroke_ray.errors import InputFileError
from stroke_ray.files import atomic_write_text

__all__ = ["check_apart", "claim_folder"]


def claim_folder(folder: str | Path, marker: str, command: str, record: dict | None = None) -> Path:
    """Make `folder` usable by `command`: create it, or accept it empty or marked as ours.

    Args:
        folder: the output folder.
        marker: the marker file's name inside it (e.g. ``.stroke-ray-synth``).
        command: the command named in the error and the marker.
        record: extra JSON facts stored in the marker.

    Raises:
        InputFileError: `folder` is a file, cannot be created, or is a non-empty folder
            without the marker (nothing in it is touched).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputFileError(folder, "exists and is not a directory")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise InputFileError(
            folder, f"folder is not empty and was not made by {command} (no {marker}); choose a new or empty folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(folder, f"cannot create the folder ({exc.strerror})") from None
    if not (folder / marker).is_file():
        atomic_write_text(folder / marker, json.dumps({"made_by": command, **(record or {})}, sort_keys=True) + "\n")
    return folder


def _real(path: str | Path) -> Path:
    # realpath resolves the links of the part that exists and keeps the rest as given.
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is, or holds, any of `inputs` (files or folders).

    Raises:
        InputFileError: naming the output folder and the first input it would hold.
    """
    out = _real(output)
    for item in inputs:
        real = _real(item)
        if real == out or out in real.parents:
            raise InputFileError(
                output, f"output folder holds the input {item}; write predictions to another folder"
            )
