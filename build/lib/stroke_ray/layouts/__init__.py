"""Dataset layouts, one module each: `isles` (ISLES'22 archive and repository example),
`atlas` (ATLAS R2.0), `nnunet` (nnU-Net v2 raw datasets).

Each module has the same small surface, which `stroke_ray.datasets` dispatches on:
``NAME``, ``LOOKS_FOR`` (one phrase for the "no layout matches" message),
``matches(root) -> bool``, ``modalities(root) -> list[str]`` and
``discover(root, chosen, require_mask) -> (cases, problems)``. Discovery looks at file
names only; it never opens an image.
"""

from stroke_ray.layouts import atlas, isles, nnunet
from stroke_ray.layouts.base import CaseFiles, Problem

__all__ = ["LAYOUTS", "CaseFiles", "Problem"]

# Detection order does not matter: a folder that matches two layouts is refused.
LAYOUTS = {module.NAME: module for module in (isles, atlas, nnunet)}
