"""Lightning callbacks: progress with throughput, last.ckpt kept fresh (and saved on SIGTERM), exact resume, NaN guard."""

from vision_mamba.callbacks.last_checkpoint import LastCheckpoint
from vision_mamba.callbacks.nonfinite import StopOnNonFiniteLoss
from vision_mamba.callbacks.progress import ThroughputProgressBar
from vision_mamba.callbacks.resume import ExactResume

__all__ = ["ExactResume", "LastCheckpoint", "StopOnNonFiniteLoss", "ThroughputProgressBar"]
