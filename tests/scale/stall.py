"""A test-only Lightning callback for kill tests: the training process stops making progress at a chosen step, so a
test can kill it at a known point instead of racing the training loop."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


class StallAtStep(Callback):
    """Sleeps before the batch after optimiser step `step`, i.e. after that step's checkpoint saves (which run at
    the end of its batch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            time.sleep(3600)
