"""Finding the cases of a dataset on disk, whatever its layout (see `stroke_ray.layouts`).

`open_dataset` recognises the layout of a folder (or of the one dataset folder directly
below it) and `Dataset.discover` lists its cases. Discovery only looks at file names; it
never opens an image. Problems that concern one subject (a missing modality, a missing
mask) are collected and returned beside the good cases, so one broken subject never stops
a whole dataset; problems with the request itself (an unknown modality or layout, a folder
that matches no layout) raise at once.

The subject id is ``sub-X`` (``_ses-Y`` appended only when a subject has several
sessions) in the BIDS-like layouts, and the case identifier in nnU-Net datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stroke_ray.errors import ConfigError, InputFileError
from stroke_ray.layouts import LAYOUTS, CaseFiles, Problem

__all__ = [
    "LAYOUT_MODALITIES", "CaseFiles", "Dataset", "Problem", "detect_layout",
    "discover", "open_dataset", "resolve_modalities",
]

# Layouts whose modalities are fixed; an nnU-Net dataset names its own in dataset.json.
LAYOUT_MODALITIES: dict[str, list[str]] = {
    name: list(module.MODALITIES) for name, module in LAYOUTS.items() if hasattr(module, "MODALITIES")
}


@dataclass(frozen=True)
class Dataset:
    """A recognised dataset: its own root folder, layout and the modalities it can hold."""

    root: Path
    layout: str
    modalities: list[str]

    def resolve(self, modalities: list[str] | None) -> list[str]:
        """Check a modality selection (see `resolve_modalities`)."""
        return resolve_modalities(self.layout, modalities, known=self.modalities)

    def discover(self, modalities: list[str] | None = None,
                 require_mask: bool = True) -> tuple[list[CaseFiles], list[Problem]]:
        """All usable cases (sorted by subject) and the problems of the others."""
        cases, problems = LAYOUTS[self.layout].discover(self.root, self.resolve(modalities), require_mask)
        cases.sort(key=lambda c: c.subject)
        return cases, problems


def _check_root(root: str | Path) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise InputFileError(path, "dataset folder does not exist" if not path.exists() else "not a folder")
    return path


def _check_layout(layout: str) -> None:
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")


def open_dataset(root: str | Path, layout: str = "auto") -> Dataset:
    """Recognise the dataset in `root`, or in the one dataset folder directly below it.

    Raises:
        InputFileError: missing root, no layout matches (the line lists what was looked
            for), several match, or several datasets one level down.
        ConfigError: an unknown layout name.
    """
    _check_layout(layout)
    path = _check_root(root)
    names = list(LAYOUTS) if layout == "auto" else [layout]
    here = [name for name in names if LAYOUTS[name].matches(path)]
    if len(here) > 1:
        raise InputFileError(path, f"matches several layouts ({', '.join(here)}); pass the layout explicitly")
    if not here:
        # The folder above the dataset (e.g. the archive's own top folder, nnUNet_raw/).
        below = [(child, name) for child in sorted(p for p in path.iterdir() if p.is_dir())
                 for name in names if not getattr(LAYOUTS[name], "NESTED", False) and LAYOUTS[name].matches(child)]
        if len(below) > 1:
            found = ", ".join(f"{child.name} ({name})" for child, name in below)
            raise InputFileError(path, f"holds several datasets ({found}); point at one of them")
        if not below:
            looked = "; ".join(LAYOUTS[name].LOOKS_FOR for name in names)
            what = "cannot tell the dataset layout" if layout == "auto" else f"not a {layout} dataset"
            raise InputFileError(path, f"{what}: looked for {looked}, here and one folder down")
        path, here = below[0][0], [below[0][1]]
    name = here[0]
    return Dataset(path, name, list(LAYOUTS[name].modalities(path)))


def detect_layout(root: str | Path) -> str:
    """The layout name of the dataset in `root` (see `open_dataset`)."""
    return open_dataset(root).layout


def resolve_modalities(layout: str, modalities: list[str] | None, known: list[str] | None = None) -> list[str]:
    """Check a modality selection against a layout's (or a dataset's) modalities.

    None means all of them. Names match case-insensitively and come back spelled as the
    layout spells them.

    Raises:
        ConfigError: an unknown layout, an empty selection, an unknown or repeated modality.
    """
    if known is None:
        if layout not in LAYOUT_MODALITIES:
            raise ConfigError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
        known = LAYOUT_MODALITIES[layout]
    if modalities is None:
        return list(known)
    by_lower = {k.lower(): k for k in known}
    chosen = [m.strip() for m in modalities if m.strip()]
    if not chosen:
        raise ConfigError(f"no modality selected; known for {layout}: {', '.join(known)}")
    unknown = [m.lower() for m in chosen if m.lower() not in by_lower]
    if unknown:
        raise ConfigError(
            f"unknown modality {', '.join(map(repr, unknown))} for layout {layout}; "
            f"known: {', '.join(known)}"
        )
    resolved = [by_lower[m.lower()] for m in chosen]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"modality listed twice in {resolved}")
    return resolved


def discover(
    root: str | Path,
    modalities: list[str] | None = None,
    layout: str = "auto",
    require_mask: bool = True,
) -> tuple[list[CaseFiles], list[Problem]]:
    """All usable cases below `root` (sorted by subject) and the problems of the others."""
    _check_layout(layout)
    if layout in LAYOUT_MODALITIES:  # a bad selection is named before the folder is searched
        resolve_modalities(layout, modalities)
    return open_dataset(root, layout).discover(modalities, require_mask)
