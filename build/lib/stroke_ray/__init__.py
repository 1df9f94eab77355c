"""stroke-ray: distributed training, tuning and serving of 3D stroke-lesion segmentation."""

__all__ = ["__version__"]

__version__ = "0.1.0"
