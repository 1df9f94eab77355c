"""stroke-ray: distributed training, tuning and serving of 3D stroke-lesion segmentation."""

__version__ = "0.1.0"
