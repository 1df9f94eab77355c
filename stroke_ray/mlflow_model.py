"""The trained model as an MLflow model: a pyfunc flavour around `checkpoint.pt`.

`save_pyfunc` writes an MLflow model folder (MLmodel, signature, pip requirements, the
checkpoint as the artifact `checkpoint`), so MLflow's own tooling works on what stroke-ray
logs: `mlflow.pyfunc.load_model("models:/stroke-ray-segmenter@champion")`, `mlflow models
serve`, and the model column of the MLflow UI.

`LesionSegmenter.predict` takes one row per case, one column per modality of the model
(e.g. dwi, adc, flair), each cell a NIfTI file path or a 3D array (then an optional `affine`
column gives its 4x4 voxel-to-world matrix; identity, 1 mm voxels, when absent). Every case
goes through the same reading, checks and sliding-window path as `stroke-ray predict`
(`ingest.load_case`, `segmenter.Segmenter`), and the result has one row per case: the uint8
lesion mask on the reference modality's grid, its volume in ml and its lesion count.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema

from stroke_ray import __version__
from stroke_ray.checkpoint import read_checkpoint
from stroke_ray.errors import InputFileError
from stroke_ray.files import CHECKPOINT_FILE
from stroke_ray.ingest import load_case
from stroke_ray.predict import lesion_stats
from stroke_ray.segmenter import Segmenter

__all__ = ["CHECKPOINT_ARTIFACT", "LesionSegmenter", "model_signature", "pip_requirements", "save_pyfunc"]

# The key of the checkpoint among the pyfunc model's artifacts (stored as artifacts/checkpoint.pt).
CHECKPOINT_ARTIFACT = "checkpoint"
# Logged as model-from-code: MLflow runs this file to build the model instead of unpickling one.
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
AFFINE_COLUMN = "affine"


def _as_rows(model_input: Any) -> list[dict[str, Any]]:
    """One dict per case from a DataFrame, a list of dicts, or one dict."""
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, Mapping):
        return [dict(model_input)]
    if isinstance(model_input, (list, tuple)) and all(isinstance(r, Mapping) for r in model_input):
        return [dict(r) for r in model_input]
    raise TypeError(
        f"expected a DataFrame (or dicts) with one column per modality, got {type(model_input).__name__}"
    )


def _write_array(value: Any, affine: Any, path: Path, name: str) -> Path:
    array = np.asarray(value)
    if array.ndim != 3:
        raise InputFileError(name, f"expected a 3D array, got shape {array.shape}")
    matrix = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64).reshape(4, 4)
    image = nib.Nifti1Image(array.astype(np.float32, copy=False), matrix)
    image.set_qform(matrix, code=1)
    image.set_sform(matrix, code=1)
    nib.save(image, path)
    return path


class LesionSegmenter(mlflow.pyfunc.PythonModel):
    """pyfunc model: NIfTI paths or 3D arrays in, lesion masks out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.segmenter = Segmenter.load(context.artifacts[CHECKPOINT_ARTIFACT])

    # `pd.DataFrame` is the hint MLflow accepts without inferring a schema from it: the
    # explicit signature (`model_signature`) describes the columns.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One row per case: `mask` (uint8, the reference modality's grid), `volume_ml`, `lesion_count`.

        Args:
            model_input: one row per case, one column per modality (file path or 3D array),
                and for arrays an optional `affine` column.
            params: `{"threshold": 0.5}` overrides the probability threshold of the mask.

        Raises:
            InputFileError: a case whose file or array fails the input checks.
        """
        segmenter = self.segmenter
        if params and "threshold" in params:
            segmenter.threshold = float(params["threshold"])
        needed = segmenter.modalities
        out = []
        for index, row in enumerate(_as_rows(model_input)):
            missing = [m for m in needed if row.get(m) is None]
            if missing:
                raise InputFileError(f"case {index}", f"missing {', '.join(missing)} (the model needs {', '.join(needed)})")
            with tempfile.TemporaryDirectory(prefix="stroke-ray-pyfunc-") as tmp:
                files = {
                    m: Path(row[m]) if isinstance(row[m], (str, Path))
                    else _write_array(row[m], row.get(AFFINE_COLUMN), Path(tmp) / f"{m}.nii.gz", f"case {index}: {m}")
                    for m in needed
                }
                case = load_case(files, subject=f"case{index}")
            prediction = segmenter.predict(case)
            out.append({"mask": prediction.mask, **lesion_stats(prediction.mask, prediction.affine)})
        return pd.DataFrame(out, columns=["mask", "volume_ml", "lesion_count"])


def model_signature(modalities: list[str]) -> ModelSignature:
    """Inputs: one column per modality (a path or an array); outputs: mask, volume, count."""
    inputs = Schema(
        [ColSpec(AnyType(), m) for m in modalities] + [ColSpec(AnyType(), AFFINE_COLUMN, required=False)]
    )
    outputs = Schema([ColSpec(AnyType(), "mask"), ColSpec("double", "volume_ml"), ColSpec("long", "lesion_count")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """What a fresh environment needs to load the model: stroke-ray and the versions it was saved with."""
    import torch

    torch_version = torch.__version__.split("+")[0]
    return [f"stroke-ray=={__version__}", f"torch=={torch_version}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}", f"nibabel=={nib.__version__}", f"pandas=={pd.__version__}"]


def save_pyfunc(checkpoint: str | Path, path: str | Path) -> Path:
    """Write the MLflow model folder for `checkpoint` at `path` (which must not exist yet).

    Args:
        checkpoint: a checkpoint.pt (or a folder holding one).
        path: the new model folder.
    """
    file = Path(checkpoint)
    file = file / CHECKPOINT_FILE if file.is_dir() else file
    modalities = list(read_checkpoint(file)["modalities"])
    with warnings.catch_warnings():
        # No input example: one would have to be a real scan on every machine that logs a model.
        warnings.filterwarnings("ignore", message=".*input example")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(MODEL_CODE),
            artifacts={CHECKPOINT_ARTIFACT: str(file)},
            signature=model_signature(modalities),
            pip_requirements=pip_requirements(),
            metadata={"stroke_ray_version": __version__, "modalities": modalities},
        )
    return Path(path)
