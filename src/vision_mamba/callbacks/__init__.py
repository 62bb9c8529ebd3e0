"""Lightning callbacks: progress with throughput, exact resume, non-finite guard, the resumable W&B logger."""

from vision_mamba.callbacks.nonfinite import StopOnNonFiniteLoss
from vision_mamba.callbacks.progress import ThroughputProgressBar
from vision_mamba.callbacks.resume import ExactResume
from vision_mamba.callbacks.wandb_logger import ResumableWandbLogger

__all__ = ["ExactResume", "ResumableWandbLogger", "StopOnNonFiniteLoss", "ThroughputProgressBar"]
