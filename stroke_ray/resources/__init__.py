"""Files that ship inside the package: the search spaces and the example training config.

They are package data (`importlib.resources`), so `stroke-ray demo`, `stroke-ray tune -s
default` and `stroke-ray train -c train_example` work from an installed wheel as from a
checkout. A name (`default`, `smoke`, `train_example`) picks a shipped file; a path picks
that file; an old checkout path such as `search_spaces/default.yaml` that no longer exists
finds the shipped file of that name.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from stroke_ray.errors import ConfigError

__all__ = ["config_file", "search_space_file", "shipped_configs", "shipped_search_spaces"]

SEARCH_SPACES = "search_spaces"
CONFIGS = "configs"


def _folder(kind: str) -> Path:
    # A wheel is installed unpacked (pip never runs a package from a zip), so the shipped
    # files are ordinary files with a path.
    return Path(str(importlib.resources.files(__name__) / kind))


def _shipped(kind: str) -> list[str]:
    return sorted(p.stem for p in _folder(kind).glob("*.yaml"))


def shipped_search_spaces() -> list[str]:
    """Names of the search spaces that ship with stroke-ray (`default`, `smoke`, ...)."""
    return _shipped(SEARCH_SPACES)


def shipped_configs() -> list[str]:
    """Names of the training configs that ship with stroke-ray (`train_example`)."""
    return _shipped(CONFIGS)


def _resolve(name_or_path: str | Path, kind: str, what: str) -> Path:
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    name = given.stem if given.suffix in (".yaml", ".yml") else given.name
    # A bare name, or a path into the folder these files had in a checkout.
    if len(given.parts) == 1 or given.parent.name == kind:
        shipped = _folder(kind) / f"{name}.yaml"
        if shipped.is_file():
            return shipped
    raise ConfigError(f"{name_or_path}: no such {what} file, and not one that ships with stroke-ray "
                      f"({', '.join(_shipped(kind))})")


def search_space_file(name_or_path: str | Path) -> Path:
    """The search-space file for a path or a shipped name such as `default` or `smoke`.

    Raises:
        ConfigError: neither an existing file nor a shipped search space.
    """
    return _resolve(name_or_path, SEARCH_SPACES, "search-space")


def config_file(name_or_path: str | Path) -> Path:
    """The training-config file for a path or a shipped name such as `train_example`.

    Raises:
        ConfigError: neither an existing file nor a shipped config.
    """
    return _resolve(name_or_path, CONFIGS, "config")
