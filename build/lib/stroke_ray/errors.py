"""User-facing errors: each carries one clear line naming the file and the problem."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "InputFileError", "StrokeRayError"]


class StrokeRayError(Exception):
    """An error the CLI reports as a single line and a non-zero exit, without a traceback."""


class InputFileError(StrokeRayError):
    """A problem with one input file (missing, unreadable, wrong shape, NaNs, ...)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(StrokeRayError):
    """A configuration or search-space file that does not validate."""
