"""nnU-Net v2 raw datasets: any dataset prepared for nnU-Net converts.

::

    <root>/dataset.json                {"channel_names": {"0": "DWI", "1": "ADC", ...},
                                        "labels": {"background": 0, "lesion": 1},
                                        "numTraining": N, "file_ending": ".nii.gz"}
    <root>/imagesTr/CASE_0000.nii.gz   channel 0 of case CASE, CASE_0001 channel 1, ...
    <root>/labelsTr/CASE.nii.gz        its lesion mask
    <root>/imagesTs/CASE_0000.nii.gz   cases without masks (found for prediction only)

Channel names map to stroke-ray's modality names where they are known (DWI, ADC, FLAIR,
T1w, case-insensitively) and otherwise keep the dataset's own names. The root may also be
the folder above (e.g. ``nnUNet_raw/`` holding one ``Dataset001_X/``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from stroke_ray.errors import InputFileError
from stroke_ray.files import NIFTI_SUFFIXES
from stroke_ray.layouts.base import CaseFiles, Problem

__all__ = [
    "NAME", "LOOKS_FOR", "CHANNEL_NAMES", "NnunetInfo", "read_info", "matches", "modalities",
    "discover", "channel_name", "image_file", "label_file",
]

NAME = "nnunet"
LOOKS_FOR = "dataset.json beside imagesTr/ (nnU-Net v2 raw dataset)"
# stroke-ray modality -> the channel name written on export; read back case-insensitively.
CHANNEL_NAMES = {"dwi": "DWI", "adc": "ADC", "flair": "FLAIR", "t1w": "T1w"}


@dataclass(frozen=True)
class NnunetInfo:
    """What dataset.json says: channel order (as modality names) and the file ending."""

    modalities: list[str]  # index i = channel i
    file_ending: str


def channel_name(modality: str) -> str:
    """The nnU-Net channel name for a stroke-ray modality (export)."""
    return CHANNEL_NAMES.get(modality, modality)


def _modality(channel: str) -> str:
    lowered = channel.strip().lower()
    return lowered if lowered in CHANNEL_NAMES else channel.strip()


def image_file(folder: Path, case: str, channel: int, ending: str) -> Path:
    return folder / f"{case}_{channel:04d}{ending}"


def label_file(folder: Path, case: str, ending: str) -> Path:
    return folder / f"{case}{ending}"


def read_info(root: Path) -> NnunetInfo:
    """Parse and check dataset.json.

    Raises:
        InputFileError: unreadable JSON, channels not numbered 0..n-1, a file ending that is
            not NIfTI, or labels other than background 0 plus one lesion label.
    """
    path = root / "dataset.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"not a readable dataset.json ({exc})") from None
    channels = doc.get("channel_names", doc.get("modality"))  # v1 called them "modality"
    if not isinstance(channels, dict) or not channels:
        raise InputFileError(path, "no channel_names (e.g. {\"0\": \"DWI\", \"1\": \"ADC\"})")
    try:
        order = sorted((int(k), str(v)) for k, v in channels.items())
    except ValueError:
        raise InputFileError(path, f"channel_names keys must be 0, 1, ...; got {list(channels)}") from None
    if [i for i, _ in order] != list(range(len(order))):
        raise InputFileError(path, f"channel_names keys must be 0..{len(order) - 1}; got {[i for i, _ in order]}")
    names = [_modality(name) for _, name in order]
    if len({n.lower() for n in names}) != len(names):
        raise InputFileError(path, f"channel names repeat: {names}")
    ending = str(doc.get("file_ending", ".nii.gz"))
    if ending not in NIFTI_SUFFIXES:
        raise InputFileError(path, f"file_ending {ending!r} is not NIfTI (.nii.gz or .nii)")
    labels = doc.get("labels", {"background": 0, "lesion": 1})
    foreground = {k: v for k, v in labels.items() if k != "background"} if isinstance(labels, dict) else {}
    if (not isinstance(labels, dict) or labels.get("background") != 0 or len(foreground) != 1
            or not all(isinstance(v, int) for v in foreground.values())):
        raise InputFileError(
            path, f"labels {labels} are not background 0 plus one lesion label; stroke-ray segments one lesion class"
        )
    lesion = next(iter(foreground.values()))
    if lesion != 1:
        raise InputFileError(path, f"the lesion label is {lesion}; stroke-ray reads masks as 0/1")
    return NnunetInfo(names, ending)


def matches(root: Path) -> bool:
    return (root / "dataset.json").is_file() and ((root / "imagesTr").is_dir() or (root / "imagesTs").is_dir())


def modalities(root: Path) -> list[str]:
    return read_info(root).modalities


def _cases_in(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.glob(f"*{ending}")) if folder.is_dir() else []:
        found = pattern.match(path.name)
        if found and not path.name.startswith("."):
            cases.setdefault(found["case"], {})[int(found["channel"])] = path
    return cases


def discover(root: Path, chosen: list[str], require_mask: bool) -> tuple[list[CaseFiles], list[Problem]]:
    """imagesTr cases (with their labelsTr masks); imagesTs too when masks are not required."""
    info = read_info(root)
    index = {name: i for i, name in enumerate(info.modalities)}
    cases, problems = [], []
    folders = [("imagesTr", "labelsTr")] + ([] if require_mask else [("imagesTs", "labelsTs")])
    seen: dict[str, str] = {}
    for images_dir, labels_dir in folders:
        for case, channels in _cases_in(root / images_dir, info.file_ending).items():
            if case in seen:
                problems.append(Problem(case, str(root / images_dir), f"same case id also in {seen[case]}/"))
                continue
            seen[case] = images_dir
            images, missing = {}, []
            for modality in chosen:
                path = channels.get(index[modality])
                if path is None:
                    expected = image_file(root / images_dir, case, index[modality], info.file_ending)
                    missing.append(Problem(case, str(expected), f"missing {modality} image"))
                else:
                    images[modality] = path
            mask = label_file(root / labels_dir, case, info.file_ending)
            if not mask.is_file():
                if require_mask:
                    missing.append(Problem(case, str(mask), "missing lesion mask"))
                mask = None
            if missing:
                problems.extend(missing)
            else:
                cases.append(CaseFiles(case, images, mask, NAME))
    return cases, problems
