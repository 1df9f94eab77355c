"""Real-scan DWI artefacts: bright regions and rims with a normal ADC, outside any lesion.

Real b1000 DWI is bright where no infarct is: the cerebellar cortex, the temporal poles,
the frontal base over the sinuses and the inferior temporal lobes over the skull base
(susceptibility pile-up of the EPI readout near air and bone, T2 shine-through), and
patches of cortical ribbon along the brain edge (partial volume, residual fat and eddy
currents). On the ISLES'22 sample these reach 1.6-2.1 x the brain median, as bright as
the infarct (1.67 x), while the ADC there stays normal (0.8-0.95 against 0.65 x in the
infarct). A model that has only seen bright = lesion marks them all; with these in the
training cases it has to use ADC too. The lesion mask is never touched here.

The sites are placed in template (MNI) millimetres, so they follow the anatomy through
the subject transform; the rim is modulated by a few random plane waves so it comes in
patches. Hot spots, small bright blobs inside the sites and along the rim, give the real
DWI's bright tail (2.5-6 x the median in a few hundred voxels of the sample case, where a
model trained without them marks false lesions). Artefacts are drawn from their own random stream, so a case's anatomy, lesions
and noise are the same with and without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from stroke_ray.synth.anatomy import Anatomy, Sampled
from stroke_ray.synth.settings import Artefacts, uniform

__all__ = ["ARTEFACT_STREAM", "REGIONS", "ArtefactDraw", "artefact_gains", "draw_artefacts"]

ARTEFACT_STREAM = 41017  # salt of the artefacts' own random stream

# Ellipsoidal sites, MNI mm: centre and radii (the weight is exp(-r^2), r = 1 on the
# ellipsoid). The cerebellum is a half-space product instead (below the tentorium).
REGIONS = {
    "temporal_pole_r": ((38.0, 14.0, -32.0), (12.0, 16.0, 12.0)),
    "temporal_pole_l": ((-38.0, 14.0, -32.0), (12.0, 16.0, 12.0)),
    "frontal_base": ((0.0, 34.0, -20.0), (28.0, 22.0, 10.0)),
    "skull_base_r": ((48.0, -22.0, -30.0), (12.0, 22.0, 10.0)),
    "skull_base_l": ((-48.0, -22.0, -30.0), (12.0, 22.0, 10.0)),
    "cerebellum": None,
}
REGION_P = 0.8  # chance that each site shows up in a case with artefacts
N_WAVES = 8


@dataclass(frozen=True)
class ArtefactDraw:
    """The artefacts of one case: gain per site (0: absent), rim gain and its patches."""

    regional: dict[str, float]
    rim: float
    rim_depth_mm: float
    adc: float
    wavevectors: np.ndarray  # (Q, 3) rad/mm, rim patchiness
    phases: np.ndarray  # (Q,)
    amplitudes: np.ndarray  # (Q,)
    spot_gains: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) hot spots
    spot_radii: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) mm
    spot_picks: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) in [0, 1): which candidate voxel

    def describe(self) -> dict:
        return {"regional_gain": {k: round(v, 3) for k, v in self.regional.items() if v > 0},
                "rim_gain": round(self.rim, 3), "adc_gain": round(self.adc, 3),
                "spots": len(self.spot_gains)}


def draw_artefacts(rng: np.random.Generator, settings: Artefacts) -> ArtefactDraw | None:
    """The artefacts of one case, or None (with probability 1 - settings.probability)."""
    if settings.probability <= 0.0 or rng.random() >= settings.probability:
        return None
    regional = {}
    for name in REGIONS:
        on = rng.random() < REGION_P
        regional[name] = uniform(rng, settings.regional_gain) if on else 0.0
    rim = uniform(rng, settings.rim_gain)
    adc = uniform(rng, settings.adc_gain)
    directions = rng.normal(size=(N_WAVES, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavevectors = 2 * np.pi * directions / rng.uniform(25.0, 60.0, N_WAVES)[:, None]
    phases, amplitudes = rng.uniform(0, 2 * np.pi, N_WAVES), rng.normal(0.0, 0.5, N_WAVES)
    # Drawn last, so that the draws above are those of artefacts without spots.
    low, high = settings.spot_count
    k = int(rng.integers(low, high + 1))
    spots = (rng.uniform(*settings.spot_gain, k), rng.uniform(*settings.spot_radius_mm, k), rng.random(k))
    return ArtefactDraw(regional, rim, settings.rim_depth_mm, adc, wavevectors, phases, amplitudes, *spots)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def artefact_gains(anatomy: Anatomy, points: Sampled, draw: ArtefactDraw) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicative gains (DWI, ADC) at the sampled voxels; both >= 1 everywhere.

    DWI: 1 + the largest of (site gain x site weight) and (rim gain x rim weight). ADC:
    1 + adc gain x the same weight normalised to [0, 1], i.e. raised a little (partial
    volume with CSF), never lowered.
    """
    mm = (anatomy.affine[:3, :3] @ points.coords + anatomy.affine[:3, 3:]).astype(np.float32)
    x, y, z = mm
    # Grey matter lights up more than white (the real rims follow the cortical ribbon).
    gm = points.tissues[0] / np.maximum(points.tissues.sum(axis=0), 1e-6)
    weight = np.zeros(points.flat.size, np.float32)
    for name, gain in draw.regional.items():
        if gain <= 0.0:
            continue
        if REGIONS[name] is None:  # cerebellum: below the tentorium and behind the brainstem
            site = _sigmoid((-24.0 - z) / 4.0) * _sigmoid((-44.0 - y) / 5.0)
        else:
            centre, radii = (np.asarray(v, np.float32)[:, None] for v in REGIONS[name])
            site = np.exp(-(((mm - centre) / radii) ** 2).sum(axis=0))
        np.maximum(weight, np.float32(gain) * site * (0.5 + 0.5 * gm), out=weight)
    if draw.rim > 0.0:
        depth = ndimage.map_coordinates(anatomy.depth_mm(), points.coords, order=1, mode="constant",
                                        cval=0.0, prefilter=False)
        waves = np.sin(draw.wavevectors.astype(np.float32) @ mm + draw.phases.astype(np.float32)[:, None])
        patches = np.clip(draw.amplitudes.astype(np.float32) @ waves + np.float32(0.25), 0.0, 1.0)
        rim = gm * np.exp(-(depth / np.float32(draw.rim_depth_mm)) ** 2) * patches
        np.maximum(weight, np.float32(draw.rim) * rim, out=weight)
    if len(draw.spot_gains):
        # Centred on voxels already lit up (weight >= 0.3: a site or the rim), picked by
        # rank among them, so a spot sits where real pile-up sits.
        lit = np.flatnonzero(weight >= 0.3)
        if lit.size:
            centres = mm[:, lit[np.minimum((draw.spot_picks * lit.size).astype(int), lit.size - 1)]]
            for centre, gain, radius in zip(centres.T, draw.spot_gains, draw.spot_radii):
                near = np.flatnonzero((np.abs(mm - centre[:, None]) <= 3.0 * radius).all(axis=0))
                d2 = ((mm[:, near] - centre[:, None]) ** 2).sum(axis=0)
                spot = np.float32(gain) * np.exp(-d2 / np.float32(radius * radius)) * (0.5 + 0.5 * gm[near])
                weight[near] = np.maximum(weight[near], spot)
    top = max([*draw.regional.values(), draw.rim, *draw.spot_gains, 1e-6])
    dwi = 1.0 + weight
    adc = 1.0 + np.float32(draw.adc) * np.minimum(weight / np.float32(top), 1.0)
    return dwi.astype(np.float32), adc.astype(np.float32)
