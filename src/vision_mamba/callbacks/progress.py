"""ThroughputProgressBar: Lightning's rich progress bar plus training images/s."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


def batch_size_of(batch: Any) -> int:
    """Images in a batch: (images, targets) tuples, dicts with 'image', or lists of images (detection)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch.get("image", batch) if isinstance(batch, dict) else batch
    if isinstance(first, (tuple, list)):
        return len(first)
    return int(first.shape[0]) if hasattr(first, "shape") else 1


class ThroughputProgressBar(RichProgressBar):
    """Shows ``img/s`` (per process, averaged over the last ``window`` batches) beside the loss and ETA."""

    def __init__(self, window: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window = window
        self._times: list[tuple[float, int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._times = [(time.perf_counter(), 0)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append((time.perf_counter(), batch_size_of(batch)))
        self._times = self._times[-(self.window + 1) :]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def images_per_second(self) -> float | None:
        if len(self._times) < 2:
            return None
        elapsed = self._times[-1][0] - self._times[0][0]
        return sum(n for _, n in self._times[1:]) / elapsed if elapsed > 0 else None

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        rate = self.images_per_second()
        if rate is not None and trainer.training:
            metrics["img/s"] = f"{rate:.0f}"
        return metrics
