"""A test-only Lightning callback for the kill and signal tests: the training process waits at a chosen step, so a
test can stop it at a known point instead of racing the training loop."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StallAtStep(Callback):
    """Waits before the batch after optimiser step `step` (so after that step's checkpoint saves, which run at the
    end of its batch) until the run's LastCheckpoint has received a signal: the next step is then the one the
    signal lands on. Without a signal it waits until killed. While it waits, `<run folder>/stalled` exists."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            (last,) = (c for c in trainer.callbacks if type(c).__name__ == "LastCheckpoint")
            Path(trainer.default_root_dir, "stalled").touch()
            while last.received is None:
                time.sleep(0.02)
