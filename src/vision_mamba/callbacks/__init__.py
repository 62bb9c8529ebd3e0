"""Lightning callbacks and plugins: progress with throughput, atomic checkpoint writes."""

from vision_mamba.callbacks.checkpoint_io import AtomicCheckpointIO
from vision_mamba.callbacks.progress import ThroughputProgressBar

__all__ = ["AtomicCheckpointIO", "ThroughputProgressBar"]
