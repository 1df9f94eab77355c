"""Lesion look-alikes: where a subject's reference image is as bright as a lesion, outside lesions.

Real DWI is bright in places that are not infarcts: the temporal poles and the frontal base
over the sinuses, the cerebellum, the cortical rim along the brain's edge, small
susceptibility hot spots. A network trained on patches sees such a spot in a random patch
now and then, and learns late that it is background; a model trained briefly marks them as
lesions (docs/accuracy.md). The look-alikes of a subject are computed once,
when its levels are written (`find_lookalikes`), and kept in the level's attributes, so a
sampler can centre a share of its patches on them (`DataConfig.lookalike_fraction`): hard
negatives, shown as often as the lesions are.

A look-alike is a local maximum of the reference channel, in the direction its lesions
differ from the brain (brighter for DWI, darker for T1w; brighter when a subject has no
lesion), at least `MIN_Z` brain standard deviations from the brain's median, and at least
`LESION_MARGIN` voxels from every lesion voxel; the `MAX_LOOKALIKES` most extreme are kept,
no two within `SEPARATION` voxels of each other.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["LESION_MARGIN", "MAX_LOOKALIKES", "MIN_Z", "SEPARATION", "find_lookalikes", "lesion_direction"]

MIN_Z = 2.0  # brain SDs from the brain median: the tail a lesion lives in (DWI lesions: 2-8)
LESION_MARGIN = 3  # voxels between a look-alike and any lesion voxel
SEPARATION = 5  # voxels: one look-alike per 5^3 neighbourhood
MAX_LOOKALIKES = 64


def lesion_direction(reference: np.ndarray, mask: np.ndarray, brain: np.ndarray) -> float:
    """+1 where lesions are brighter than the brain's median on `reference`, -1 darker; +1
    without lesions (DWI, the reference modality of ISLES'22)."""
    lesion = mask.astype(bool) & brain
    if not lesion.any() or not brain.any():
        return 1.0
    return 1.0 if float(np.median(reference[lesion])) >= float(np.median(reference[brain])) else -1.0


def find_lookalikes(image: np.ndarray, mask: np.ndarray, max_count: int = MAX_LOOKALIKES) -> np.ndarray:
    """Voxel coordinates (N, 3), int32, of a subject's lesion look-alikes on one level.

    Args:
        image: the level's raw image (C, X, Y, Z); channel 0 is the reference modality, and
            the brain is where it is non-zero (skull-stripped data; air is 0).
        mask: the level's lesion mask (X, Y, Z).
        max_count: at most this many, the most extreme first.
    """
    reference = np.asarray(image[0], dtype=np.float32)
    brain = reference != 0
    if brain.sum() < 64:
        return np.zeros((0, 3), np.int32)
    sign = lesion_direction(reference, mask, brain)
    values = reference[brain]
    median = float(np.median(values))
    spread = float(np.std(values)) or 1.0
    z = np.where(brain, sign * (reference - median) / spread, -np.inf).astype(np.float32)
    near_lesion = ndimage.binary_dilation(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), bool),
                                          iterations=LESION_MARGIN)  # a cube of LESION_MARGIN around each voxel
    peaks = (z >= MIN_Z) & (z == ndimage.maximum_filter(z, size=SEPARATION, mode="constant", cval=-np.inf))
    peaks &= ~near_lesion
    coords = np.argwhere(peaks)
    if len(coords) == 0:
        return np.zeros((0, 3), np.int32)
    order = np.argsort(-z[tuple(coords.T)], kind="stable")[:max_count]
    return coords[order].astype(np.int32)
