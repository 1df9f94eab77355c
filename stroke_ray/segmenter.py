"""A trained model and how to apply it to one case: the unit `predict`, `serve` and the
MLflow model share.

`Segmenter.load(model_ref)` resolves any model reference (`model_ref.resolve_checkpoint`),
loads the checkpoint weights-only (a single network or a fold ensemble, alike) and labels
its version. `Segmenter.predict(case)` runs `inference.predict_case` with the checkpoint's
level, patch size and normalisation, mirroring test-time augmentation over `mirror_axes`,
then thresholds and removes small components as the checkpoint's stored postprocessing
says (`postprocess.Postprocessing`), unless the caller overrides the threshold or the
minimum lesion size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from stroke_ray.checkpoint import load_checkpoint
from stroke_ray.config import mirror_axes
from stroke_ray.errors import ConfigError
from stroke_ray.grid import spacing_of
from stroke_ray.inference import ALL_AXES, Prediction, predict_case
from stroke_ray.model_ref import CHAMPION_URI, pin_version, resolve_checkpoint, version_label
from stroke_ray.models import size_multiple
from stroke_ray.postprocess import Postprocessing, remove_small_lesions

__all__ = ["Segmenter", "default_device", "default_tta_axes"]


def default_device() -> str:
    """The first GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_tta_axes(config: Any) -> tuple[int, ...]:
    """The mirroring axes used when none are asked for: all three, as nnU-Net predicts."""
    return ALL_AXES


@dataclass
class Segmenter:
    """A loaded checkpoint plus how to apply it.

    `threshold` and `min_lesion_ml` default to the checkpoint's stored postprocessing
    (threshold 0.5 and no removal when it has none); `tta_axes` to `default_tta_axes`.
    """

    loaded: Any  # checkpoint.LoadedModel
    model_ref: str
    version: str
    device: str = "cpu"
    threshold: float | None = None
    batch_size: int = 2
    tta_axes: tuple[int, ...] | None = None
    min_lesion_ml: float | None = None

    @classmethod
    def load(
        cls,
        model_ref: str | Path = CHAMPION_URI,
        tracking_uri: str | None = None,
        device: str | None = None,
        threshold: float | None = None,
        tta_axes: Sequence[int] | None = None,
        min_lesion_ml: float | None = None,
    ) -> "Segmenter":
        """Resolve `model_ref`, load its weights (weights_only) and label its version.

        Raises:
            ConfigError: bad `tta_axes`, `threshold` or `min_lesion_ml`.
        """
        try:  # the overrides are checked before any model is fetched
            axes = None if tta_axes is None else mirror_axes(tta_axes)
            Postprocessing(min_lesion_ml=min_lesion_ml or 0.0, threshold=0.5 if threshold is None else threshold)
        except ValueError as exc:
            raise ConfigError(f"prediction settings: {exc}") from None
        device = device or default_device()
        # The alias is read once: the weights and their label are the same version.
        pinned = pin_version(model_ref, tracking_uri)
        path = resolve_checkpoint(pinned, tracking_uri)
        loaded = load_checkpoint(path, device=device)
        version = version_label(pinned, path, tracking_uri)
        return cls(loaded=loaded, model_ref=str(model_ref), version=version, device=device,
                   threshold=threshold, tta_axes=axes, min_lesion_ml=min_lesion_ml)

    @property
    def modalities(self) -> list[str]:
        return list(self.loaded.modalities)

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """The test-time mirroring axes in use (() = none)."""
        return default_tta_axes(self.loaded.config) if self.tta_axes is None else tuple(self.tta_axes)

    @property
    def postprocessing(self) -> Postprocessing:
        """The checkpoint's postprocessing with this segmenter's overrides."""
        stored = self.loaded.postprocessing
        return Postprocessing(
            min_lesion_ml=stored.min_lesion_ml if self.min_lesion_ml is None else float(self.min_lesion_ml),
            threshold=stored.threshold if self.threshold is None else float(self.threshold),
        )

    def predict(self, case: Any) -> Prediction:
        """inference.Prediction for an ingest.PreparedCase, on the case's reference grid.

        The mask is thresholded and rid of components below the minimum lesion size.
        """
        cfg = self.loaded.config
        post = self.postprocessing
        prediction = predict_case(
            self.loaded.model,
            case,
            level=cfg.data.level,
            patch_size=cfg.data.patch_size,
            normalization=self.loaded.normalization,
            overlap=cfg.val_overlap,
            batch_size=self.batch_size,
            device=self.device,
            threshold=post.threshold,
            multiple=size_multiple(cfg.model),
            tta_axes=self.mirror_axes,
        )
        prediction.mask = remove_small_lesions(prediction.mask, spacing_of(prediction.affine), post.min_lesion_ml)
        return prediction
