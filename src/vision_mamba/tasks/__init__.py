"""LightningModules, one per task: classification, segmentation, detection."""

from vision_mamba.tasks.base import VisionTask
from vision_mamba.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask", "VisionTask"]
