"""Lightning callbacks and plugins: progress with throughput, atomic checkpoints, exact resume, non-finite guard."""

from vision_mamba.callbacks.checkpoint_io import AtomicCheckpointIO
from vision_mamba.callbacks.nonfinite import StopOnNonFiniteLoss
from vision_mamba.callbacks.progress import ThroughputProgressBar
from vision_mamba.callbacks.resume import ExactResume
from vision_mamba.callbacks.wandb_logger import ResumableWandbLogger

__all__ = ["AtomicCheckpointIO", "ExactResume", "ResumableWandbLogger", "StopOnNonFiniteLoss", "ThroughputProgressBar"]
