"""The Zarr store: one per dataset, one group per subject, one sub-group per resolution level.

Layout (zarr format 3)::

    <store>/                       attrs: format, format_version, modalities, reference_modality,
                                          levels, normalization
      subjects/<subject>/          attrs: complete (written last), sources, reference, levels,
                                          norm, lesion_voxels, ...
        <level>/image              float32 (C, X, Y, Z)   C = len(modalities), raw intensities
        <level>/mask               uint8   (X, Y, Z)
        <level>/mask_integral      int32/64 (X+1, Y+1, Z+1)  summed-volume table of the mask

`<level>` is "native" (the reference modality's own grid) or the edge length of a cubic
training grid ("64", "128"). Intensities are stored raw; the per-channel normalisation
statistics sit in the subject's attrs and readers apply them (`normalise`).

A subject is visible to readers only once its `complete` attribute is written, which is the
last write of its conversion, so an interrupted conversion never looks finished. Paths may
be local folders or fsspec URLs (s3://..., gs://..., memory://...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from stroke_ray.errors import StrokeRayError
from stroke_ray.grid import spacing_of
from stroke_ray.integral import integral_volume
from stroke_ray.intensity import normalise
from stroke_ray.locations import local_or_url

__all__ = [
    "CHUNK_EDGE",
    "COMPRESSOR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NATIVE",
    "LevelArrays",
    "StoreError",
    "StrokeStore",
]

FORMAT_NAME = "stroke-ray"
FORMAT_VERSION = 1
NATIVE = "native"

# Chosen by measurement of random 64^3 patch and whole-volume reads on 128^3 and 192^3
# levels (benchmarks/bench_chunks.py, docs/data.md): all channels of a 64^3 block in one
# chunk means fewer chunks per patch, and lz4 decompresses 2-5x faster than zstd at
# about the same size (within 6 %).
CHUNK_EDGE = 64
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class StoreError(StrokeRayError, ValueError):
    """A store that cannot be used: not a stroke-ray store, too new, or other settings."""


@dataclass
class LevelArrays:
    """What one resolution level of one subject holds."""

    image: np.ndarray  # (C, X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # 4x4 voxel -> world
    mask_integral: np.ndarray | None = None


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


class StrokeStore:
    """Read and write access to a stroke-ray Zarr store."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{url}: not a stroke-ray store (no 'format: {FORMAT_NAME}' attribute)")
        if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
            raise StoreError(
                f"{url}: store format version {attrs.get('format_version')} is newer than this "
                f"stroke-ray understands ({FORMAT_VERSION}); upgrade stroke-ray"
            )

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
        if group is not None and group.attrs.get("format") == FORMAT_NAME:
            have = {k: group.attrs.get(k) for k in wanted}
            if have != wanted:
                raise StoreError(
                    f"{url}: existing store was made with {have}, not {wanted}; "
                    "use another output path or delete the store"
                )
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
        return [n for n in names if subjects[n].attrs.get("complete") is True]

    def is_complete(self, subject: str) -> bool:
        try:
            return self.group["subjects"][subject].attrs.get("complete") is True
        except KeyError:
            return False

    # --- per-subject reading -------------------------------------------------------------
    def meta(self, subject: str) -> dict[str, Any]:
        """All attributes of a subject (sources, reference grid, levels, norm stats, ...)."""
        return dict(self.group["subjects"][subject].attrs)

    def _level(self, subject: str, level: str | int) -> zarr.Group:
        return self.group["subjects"][subject][str(level)]

    def image(self, subject: str, level: str | int = NATIVE) -> zarr.Array:
        """Raw multi-channel image (C, X, Y, Z), lazily read."""
        return self._level(subject, level)["image"]

    def mask(self, subject: str, level: str | int = NATIVE) -> zarr.Array:
        return self._level(subject, level)["mask"]

    def mask_integral(self, subject: str, level: str | int = NATIVE) -> zarr.Array:
        return self._level(subject, level)["mask_integral"]

    def affine(self, subject: str, level: str | int = NATIVE) -> np.ndarray:
        return np.asarray(self.meta(subject)["levels"][str(level)]["affine"], dtype=np.float64)

    def norm_stats(self, subject: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) for the normalisation the store was made with."""
        norm = self.meta(subject)["norm"]
        return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)

    def normalise(self, subject: str, image: np.ndarray) -> np.ndarray:
        """Apply the store's intensity normalisation to a (C, ...) array read from it."""
        stats = None if self.normalization == "none" else self.meta(subject)["norm"]
        return normalise(image, self.normalization, stats)

    # --- per-subject writing -------------------------------------------------------------
    def delete_subject(self, subject: str) -> None:
        subjects = self.group["subjects"]
        if subject in subjects:
            del subjects[subject]

    def write_subject(
        self,
        subject: str,
        levels: dict[str, LevelArrays],
        attrs: dict[str, Any],
        chunk_edge: int = CHUNK_EDGE,
    ) -> None:
        """Write all levels of a subject, then mark it complete (the last write).

        A partial group from an earlier interrupted run is removed first.
        """
        self.delete_subject(subject)
        group = self.group["subjects"].create_group(subject)
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
        group.attrs.update(_jsonable({**attrs, "levels": level_attrs}))
        group.attrs["complete"] = True
