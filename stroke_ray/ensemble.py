"""An ensemble of segmentation networks that looks like one network.

`Ensemble(members)` runs every member on the same input, averages their foreground (sigmoid)
or class (softmax) probabilities, and returns the **logits of the averaged probabilities**:
`logit(p)` for one output channel, `log(p)` for several (softmax of log-probabilities gives
the probabilities back). Everything that takes a logits network (sliding windows,
test-time mirroring, export, serving) therefore works on an ensemble unchanged, and
averages probabilities, as nnU-Net's fold ensembles do. The arithmetic is in float64, so an
ensemble of identical members gives the single member's probabilities to float32 rounding.

Saving and loading (one `checkpoint.pt` holding every member) are in `checkpoint.py`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Ensemble"]

# Probabilities are kept this far from 0 and 1 so that the logits stay finite.
_EPS = 1e-12


class Ensemble(nn.Module):
    """Members' probabilities averaged, returned as logits (see the module docstring).

    Args:
        members: networks with the same input and output channels.

    Raises:
        ValueError: no members.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            logits = member(x).double()
            prob = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
            total = prob if total is None else total + prob
        mean = (total / len(self.members)).clamp(_EPS, 1.0 - _EPS)
        if mean.shape[1] == 1:
            out = torch.log(mean) - torch.log1p(-mean)
        else:
            out = torch.log(mean)
        return out.to(x.dtype if x.is_floating_point() else torch.float32)
