"""Intensities: per-tissue contrasts of each modality, lesion scaling, bias field and noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stroke_ray.synth.anatomy import Sampled

__all__ = ["CONTRASTS", "Contrast", "FLAIR_MISMATCH_P", "render"]


@dataclass(frozen=True)
class Contrast:
    """Mean tissue intensities of one modality and how a lesion scales them."""

    gm: float
    wm: float
    csf: float
    lesion: tuple[float, float]  # multiplicative factor range inside the lesion
    noise: float  # noise sigma as a fraction of the WM intensity
    rician: bool = True  # magnitude images; ADC is a computed map (Gaussian noise)
    gain: float = 0.2  # per-case global gain range (+-), 0 for quantitative maps


# DWI (b=800-1000) and ADC (1e-3 mm^2/s, as the ISLES'22 files store it) are matched to
# the real sample's brain ranges: DWI median ~270, ADC median ~0.9, FLAIR median ~1100,
# lesion DWI x1.74 and ADC x0.69 of the brain median.
CONTRASTS = {
    "dwi": Contrast(gm=320.0, wm=255.0, csf=70.0, lesion=(1.5, 2.5), noise=0.03),
    "adc": Contrast(gm=0.85, wm=0.72, csf=3.0, lesion=(0.4, 0.7), noise=0.03, rician=False, gain=0.0),
    "flair": Contrast(gm=1250.0, wm=1000.0, csf=300.0, lesion=(1.1, 1.3), noise=0.03),
    "t1w": Contrast(gm=70.0, wm=110.0, csf=25.0, lesion=(0.35, 0.7), noise=0.02),
}
# Share of acute cases imaged early enough that FLAIR does not show the lesion yet
# (the DWI-FLAIR mismatch used to time strokes).
FLAIR_MISMATCH_P = 0.3


def render(modality: str, points: Sampled, factor: float, rng: np.random.Generator, *,
           tissue_jitter: float = 0.08, bias_sd: float = 0.08, noise_scale: float = 1.0,
           artefact: np.ndarray | None = None) -> np.ndarray:
    """Intensities of one modality at the sampled brain voxels (outside stays 0, as the
    skull-stripped ISLES'22 release).

    Args:
        factor: lesion intensity factor (1 + (factor - 1) x lesion fraction).
        tissue_jitter: per-case relative jitter of each tissue's intensity.
        bias_sd: SD of the bias field's quadratic coefficients (per 100 mm).
        noise_scale: times the modality's own noise sigma.
        artefact: (n,) multiplicative gain applied before the noise (scanner artefacts).
    """
    c = CONTRASTS[modality]
    jitter = rng.uniform(1.0 - tissue_jitter, 1.0 + tissue_jitter, 3)
    gain = 1.0 + rng.uniform(-c.gain, c.gain) if c.gain else 1.0
    values = (np.array([c.gm, c.wm, c.csf]) * jitter * gain).astype(np.float32)
    image = values @ points.tissues
    image *= 1.0 + np.float32(factor - 1.0) * points.lesion
    if artefact is not None:
        image *= artefact
    if c.gain:  # coil sensitivity: a magnitude-image effect, not in computed ADC maps
        image *= _bias_field(points, rng, bias_sd)
    sigma = np.float32(c.noise * c.wm * gain * noise_scale)
    n1 = rng.standard_normal(image.size, dtype=np.float32) * sigma
    if c.rician:
        n2 = rng.standard_normal(image.size, dtype=np.float32) * sigma
        return np.sqrt((image + n1) ** 2 + n2 ** 2)
    return image + n1


def _bias_field(points: Sampled, rng: np.random.Generator, sd: float) -> np.ndarray:
    """exp of a random quadratic in world position (per 100 mm): about +-15 % across the
    head for sd = 0.08."""
    grid = points.grid
    ijk = np.vstack([*np.unravel_index(points.flat, grid.shape), np.ones(points.flat.size)])
    centre = (np.asarray(grid.shape) - 1) / 2.0
    rel = (grid.affine[:3, :3] / 100.0).astype(np.float32) @ (ijk[:3] - centre[:, None]).astype(np.float32)
    x, y, z = rel
    a = rng.normal(0.0, sd, 9).astype(np.float32)
    log = a[0] * x + a[1] * y + a[2] * z + a[3] * x * y + a[4] * y * z + a[5] * x * z
    log += a[6] * x * x + a[7] * y * y + a[8] * z * z
    return np.exp(log)

