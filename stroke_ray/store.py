"""The Zarr store: one per dataset, one group per subject, one sub-group per resolution level.

Layout (zarr format 3, format version 2)::

    <store>/                       attrs: format, format_version, modalities, reference_modality,
                                          levels, normalization
      subjects/<subject>/          attrs: current (the version readers use)
        <version>/                 attrs: complete, sources, reference, levels, norm, ...
          <level>/image            float32 (C, X, Y, Z)   C = len(modalities), raw intensities
          <level>/mask             uint8   (X, Y, Z)
          <level>/mask_integral    int32/64 (X+1, Y+1, Z+1)  summed-volume table of the mask

`<level>` is "native" (the reference modality's own grid) or the edge length of a cubic
training grid ("64", "128"). Intensities are stored raw; the per-channel normalisation
statistics sit in the subject's attrs and readers apply them (`normalise`).

Writing a subject never touches the version readers use: the new version is written
beside it, marked complete, and then `current` is switched in one metadata write (atomic on
local disks, where zarr renames a temporary file, and on object stores, where a PUT is);
only then are older versions removed. A crash at any point leaves the old or the new
subject readable, never neither, and a subject that was never completed stays invisible.
Paths may be local folders or fsspec URLs (s3://..., gs://..., memory://...).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from stroke_ray.errors import StrokeRayError
from stroke_ray.grid import NATIVE, spacing_of  # store.NATIVE re-exports the level name
from stroke_ray.integral import integral_volume
from stroke_ray.intensity import normalise
from stroke_ray.locations import is_url, local_or_url

__all__ = [
    "CHUNK_EDGE",
    "COMPRESSOR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NATIVE",
    "LevelArrays",
    "StoreError",
    "StoreSettingsError",
    "StrokeStore",
    "check_output",
]

FORMAT_NAME = "stroke-ray"
# Format history; `_check_format` and `_upgrade_format` are the only code that knows it.
#   1: subjects/<subject>/<level>/..., `complete` on the subject group.
#   2: subjects/<subject>/<version>/<level>/..., `current` on the subject group names the
#      complete version (rewrites go beside the old version). A version-1 subject is a
#      valid version-2 subject read in place, so opening a version-1 store needs no
#      migration; the first write into it records version 2.
FORMAT_VERSION = 2

# Chosen by measurement of random 64^3 patch and whole-volume reads on 128^3 and 192^3
# levels (benchmarks/bench_chunks.py, docs/data.md): all channels of a 64^3 block in one
# chunk means fewer chunks per patch, and lz4 decompresses 2-5x faster than zstd at
# about the same size (within 6 %).
CHUNK_EDGE = 64
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class StoreError(StrokeRayError, ValueError):
    """A store that cannot be used: not a stroke-ray store, too new, or other settings."""


class StoreSettingsError(StoreError):
    """An existing store made with other modalities, levels or normalization than asked for.

    Attributes:
        url: the store.
        have: its settings (modalities, reference_modality, levels, normalization).
        wanted: the settings asked for.
    """

    def __init__(self, url: str, have: dict[str, Any], wanted: dict[str, Any]):
        self.url, self.have, self.wanted = url, have, wanted
        super().__init__(f"{url}: existing store was made with {self.describe(have)}, not "
                         f"{self.describe(wanted)}; use those settings, another output path, or delete the store")

    @staticmethod
    def describe(settings: dict[str, Any]) -> str:
        """"modalities dwi,adc, levels native,64, normalization zscore"."""
        return (f"modalities {','.join(settings.get('modalities') or [])}, "
                f"levels {','.join(settings.get('levels') or [])}, normalization {settings.get('normalization')}")


@dataclass
class LevelArrays:
    """What one resolution level of one subject holds."""

    image: np.ndarray  # (C, X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # 4x4 voxel -> world
    mask_integral: np.ndarray | None = None
    lookalikes: np.ndarray | None = None  # (N, 3) voxels of lesion look-alikes (lookalikes.py)


def _chunks(shape: tuple[int, ...], edge: int) -> tuple[int, ...]:
    # Images keep every channel of a block together: readers always take all channels.
    spatial = tuple(min(edge, s) for s in shape[-3:])
    return (shape[0], *spatial) if len(shape) == 4 else spatial


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_format(attrs: dict, url: str) -> int:
    """The store's format version, if this code reads it."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{url}: not a stroke-ray store (no 'format: {FORMAT_NAME}' attribute)")
    version = int(attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{url}: store format version {version} is newer than this stroke-ray understands "
            f"({FORMAT_VERSION}); upgrade stroke-ray"
        )
    if version < 1:
        raise StoreError(f"{url}: store format version {attrs.get('format_version')!r} is not known")
    return version


def _upgrade_format(group: zarr.Group, version: int) -> None:
    """Bring a store to FORMAT_VERSION before writing the current layout into it."""
    # 1 -> 2: nothing moves (version-1 subjects are read in place); the attribute tells
    # older stroke-ray versions not to read the store's new, versioned subjects.
    if version < FORMAT_VERSION:
        group.attrs["format_version"] = FORMAT_VERSION


def check_output(url: str) -> None:
    """Refuse a local output that is a file, or a non-empty folder that is no stroke-ray store.

    Called before anything (even a lock file) is written, so a wrong `-o` touches nothing.
    URLs are checked by `StrokeStore.create` when the store is opened.

    Raises:
        StoreError: naming the path and the problem.
    """
    location = local_or_url(url)
    if is_url(location):
        return
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{location}: exists and is not a folder; use another output path")
    if not path.is_dir():
        return
    if (path / "zarr.json").is_file():
        try:
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            attrs = {}
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{location}: a Zarr store that stroke-ray did not make; use another output path")
        return
    if any(not p.name.startswith(".stroke-ray-lock") for p in path.iterdir()):
        raise StoreError(f"{location}: folder is not empty and is not a stroke-ray store; use another output path")


def _new_version() -> str:
    # Unique per writer and time; never a level name ("native", "64", "2mm").
    return f"v{time.time_ns():x}-{os.getpid()}"


class StrokeStore:
    """Read and write access to a stroke-ray Zarr store."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self.format_version = _check_format(dict(group.attrs), url)
        self._data: dict[str, zarr.Group] = {}  # subject -> group of its current version

    # --- opening -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        url: str,
        modalities: list[str],
        levels: list[str],
        normalization: str = "zscore",
        storage_options: dict | None = None,
        **extra: Any,
    ) -> "StrokeStore":
        """Create a new store, or open an existing one whose settings match."""
        url = local_or_url(url)
        try:
            group = zarr.open_group(url, mode="r+", storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        wanted = {
            "modalities": list(modalities),
            "reference_modality": modalities[0],
            "levels": list(levels),
            "normalization": normalization,
        }
        if group is not None and group.attrs.get("format") != FORMAT_NAME and (
                dict(group.attrs) or any(True for _ in group.members())):
            raise StoreError(f"{url}: a Zarr store that stroke-ray did not make; use another output path")
        if group is not None and group.attrs.get("format") == FORMAT_NAME:
            have = {k: group.attrs.get(k) for k in wanted}
            if have != wanted:
                raise StoreSettingsError(url, have, wanted)
            return cls(group, url)
        group = zarr.open_group(url, mode="a", zarr_format=3, storage_options=storage_options)
        group.attrs.update(
            {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **wanted, **_jsonable(extra)}
        )
        group.require_group("subjects")
        return cls(group, url)

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "StrokeStore":
        """Open an existing store for reading (mode 'r') or updating (mode 'r+')."""
        url = local_or_url(url)
        try:
            group = zarr.open_group(url, mode=mode, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise FileNotFoundError(f"{url}: no Zarr store here") from exc
        return cls(group, url)

    # --- store-wide facts ----------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.group.attrs["modalities"])

    @property
    def levels(self) -> list[str]:
        return list(self.group.attrs["levels"])

    @property
    def normalization(self) -> str:
        return str(self.group.attrs.get("normalization", "none"))

    def subjects(self, include_incomplete: bool = False) -> list[str]:
        """Subject ids, sorted; only complete ones unless asked otherwise."""
        subjects = self.group["subjects"]
        names = sorted(name for name, _ in subjects.groups())
        if include_incomplete:
            return names
        return [n for n in names if _current(subjects[n]) is not None]

    def is_complete(self, subject: str) -> bool:
        try:
            return _current(self.group["subjects"][subject]) is not None
        except KeyError:
            return False

    # --- per-subject reading -------------------------------------------------------------
    def _subject_data(self, subject: str) -> zarr.Group:
        """The group of the subject's current, complete version (KeyError if none)."""
        if subject not in self._data:
            holder = self.group["subjects"][subject]
            current = _current(holder)
            if current is None:
                raise KeyError(f"{self.url}: subject {subject!r} has no complete version")
            self._data[subject] = holder if current == "" else holder[current]
        return self._data[subject]

    def meta(self, subject: str) -> dict[str, Any]:
        """All attributes of a subject (sources, reference grid, levels, norm stats, ...)."""
        return dict(self._subject_data(subject).attrs)

    def _level(self, subject: str, level: str | int) -> zarr.Group:
        return self._subject_data(subject)[str(level)]

    def image(self, subject: str, level: str | int = NATIVE) -> zarr.Array:
        """Raw multi-channel image (C, X, Y, Z), lazily read."""
        return self._level(subject, level)["image"]

    def mask(self, subject: str, level: str | int = NATIVE) -> zarr.Array:
        return self._level(subject, level)["mask"]

    def mask_integral(self, subject: str, level: str | int = NATIVE) -> zarr.Array:
        return self._level(subject, level)["mask_integral"]

    def affine(self, subject: str, level: str | int = NATIVE) -> np.ndarray:
        return np.asarray(self.meta(subject)["levels"][str(level)]["affine"], dtype=np.float64)

    def lookalikes(self, subject: str, level: str | int) -> np.ndarray | None:
        """(N, 3) voxels of the subject's lesion look-alikes at `level`; None for a subject
        written before look-alikes were recorded (reconvert it to get them)."""
        found = self.meta(subject)["levels"][str(level)].get("lookalikes")
        return None if found is None else np.asarray(found, dtype=np.int64).reshape(-1, 3)

    def norm_stats(self, subject: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) for the normalisation the store was made with."""
        norm = self.meta(subject)["norm"]
        return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)

    def normalise(self, subject: str, image: np.ndarray, in_place: bool = False) -> np.ndarray:
        """Apply the store's intensity normalisation to a (C, ...) array read from it
        (`in_place`: overwrite a float32 array the caller owns)."""
        stats = None if self.normalization == "none" else self.meta(subject)["norm"]
        return normalise(image, self.normalization, stats, in_place=in_place)

    # --- per-subject writing -------------------------------------------------------------
    def delete_subject(self, subject: str) -> None:
        subjects = self.group["subjects"]
        self._data.pop(subject, None)
        if subject in subjects:
            del subjects[subject]

    def write_subject(
        self,
        subject: str,
        levels: dict[str, LevelArrays],
        attrs: dict[str, Any],
        chunk_edge: int = CHUNK_EDGE,
    ) -> None:
        """Write all levels of a subject as a new version, then switch readers to it.

        The version readers use is untouched until the new one is complete; the switch is
        one metadata write; older versions (and versions left by interrupted runs) are
        removed after it.
        """
        _upgrade_format(self.group, self.format_version)
        self.format_version = FORMAT_VERSION
        holder = self.group["subjects"].require_group(subject)
        version = _new_version()
        group = holder.create_group(version)
        level_attrs: dict[str, Any] = {}
        for name, arrays in levels.items():
            lg = group.create_group(str(name))
            image = np.ascontiguousarray(arrays.image, dtype=np.float32)
            mask = np.ascontiguousarray(arrays.mask, dtype=np.uint8)
            integral = arrays.mask_integral if arrays.mask_integral is not None else integral_volume(mask)
            for key, data in (("image", image), ("mask", mask), ("mask_integral", integral)):
                arr = lg.create_array(
                    key,
                    shape=data.shape,
                    dtype=data.dtype,
                    chunks=_chunks(data.shape, chunk_edge),
                    compressors=COMPRESSOR,
                    fill_value=0,
                )
                arr[...] = data
            level_attrs[str(name)] = {
                "shape": list(mask.shape),
                "affine": np.asarray(arrays.affine).tolist(),
                "spacing": spacing_of(arrays.affine).tolist(),
                "lesion_voxels": int(mask.sum()),
            }
            if arrays.lookalikes is not None:
                level_attrs[str(name)]["lookalikes"] = np.asarray(arrays.lookalikes, np.int64).tolist()
        group.attrs.update(_jsonable({**attrs, "levels": level_attrs, "complete": True}))
        self._switch(holder, version)
        self._data.pop(subject, None)
        self.drop_old_versions(subject)

    def drop_old_versions(self, subject: str) -> None:
        """Remove every version of a subject but the current one (replaced versions, versions
        of interrupted writes, format-1 levels); readers never use them."""
        holder = self.group["subjects"][subject]
        current = _current(holder)
        if not current:  # nothing complete (or a format-1 subject): nothing is garbage yet
            return
        for name, _ in list(holder.members()):
            if name != current:
                del holder[name]

    @staticmethod
    def _switch(holder: zarr.Group, version: str) -> None:
        # One write of the subject group's metadata, replacing every attribute (a format-1
        # subject's own attributes go with it): readers see the old version or the new one.
        holder.attrs.put({"current": version})


def _current(holder: zarr.Group) -> str | None:
    """The version readers use: its name, "" for a format-1 subject, None if none is complete."""
    attrs = holder.attrs
    current = attrs.get("current")
    if current is not None:
        return str(current)
    return "" if attrs.get("complete") is True else None
