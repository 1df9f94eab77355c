"""The model-from-code file MLflow copies into every logged stroke-ray model.

MLflow runs this file when it loads the model (`mlflow.pyfunc.load_model`, `mlflow models
serve`), instead of unpickling a Python object: what runs is this code and the installed
stroke-ray, never bytes from the artifact store.
"""

import mlflow

from stroke_ray.mlflow_model import LesionSegmenter

__all__: list[str] = []

mlflow.models.set_model(LesionSegmenter())
