"""Lightning callbacks: progress with throughput, exact resume, non-finite guard."""

from vision_mamba.callbacks.nonfinite import StopOnNonFiniteLoss
from vision_mamba.callbacks.progress import ThroughputProgressBar
from vision_mamba.callbacks.resume import ExactResume

__all__ = ["ExactResume", "StopOnNonFiniteLoss", "ThroughputProgressBar"]
