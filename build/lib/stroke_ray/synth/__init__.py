"""Synthetic ISLES'22- and ATLAS-like stroke cases on real MNI152 anatomy.

Every case starts from the ICBM152 2009 template that nilearn ships inside its package
(T1, grey- and white-matter probability maps at 1 mm; no download): the three tissue
fractions (GM, WM, CSF) are carried through a random subject transform (small affine plus
a smooth elastic displacement) straight onto each acquisition grid, with a Gaussian
pre-filter matching the voxel footprint so that coarse voxels mix tissues (partial
volume) instead of aliasing. Intensities are a per-tissue mix with per-case jitter, lesions
scale them (DWI up, ADC down, FLAIR slightly up, T1w down), then a smooth multiplicative
bias field and Rician noise are applied and the background is zeroed, like the
skull-stripped ISLES'22 data.

Case k is drawn from ``numpy.random.default_rng([seed, k])`` alone, so it is the same
whatever the number of cases asked for, and the files are byte-identical across runs
(gzip with a fixed header time). See docs/synthetic.md for the numbers and the limits.
"""

from stroke_ray.synth.anatomy import Anatomy, Grid, SubjectTransform, mni_anatomy
from stroke_ray.synth.cases import BRAIN_SCALE, LAYOUTS, SynthCase, subject_id, synth_case
from stroke_ray.synth.contrast import CONTRASTS, FLAIR_MISMATCH_P, Contrast
from stroke_ray.synth.lesions import LESION_CLASSES, TERRITORIES
from stroke_ray.synth.settings import (
    PROFILES,
    Artefacts,
    Scanner,
    SynthSettings,
    settings_for,
    without_artefacts,
)
from stroke_ray.synth.writing import ATLAS_SPACE, SYNTH_MARKER, generate_dataset, write_case

__all__ = [
    "ATLAS_SPACE", "Anatomy", "Artefacts", "BRAIN_SCALE", "CONTRASTS", "Contrast", "FLAIR_MISMATCH_P",
    "Grid", "LAYOUTS", "LESION_CLASSES", "PROFILES", "Scanner", "SubjectTransform", "SynthCase",
    "SYNTH_MARKER", "SynthSettings", "TERRITORIES", "generate_dataset", "mni_anatomy", "settings_for", "subject_id",
    "synth_case", "without_artefacts", "write_case",
]
