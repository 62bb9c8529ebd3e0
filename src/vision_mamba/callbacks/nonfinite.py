"""StopOnNonFiniteLoss: stops training at the first NaN/inf loss, before it reaches the weights or a checkpoint."""

from __future__ import annotations

import math

import torch
from lightning import Callback

from vision_mamba.utils.errors import UserError


class NonFiniteLossError(UserError):
    """Training diverged; the message says where and what to change (printed without a traceback)."""


class StopOnNonFiniteLoss(Callback):
    """Checks the loss before ``backward``: a non-finite one raises NonFiniteLossError.

    Raising here (rather than setting ``trainer.should_stop``) means no optimiser step and no checkpoint
    is taken with the bad values, so ``last.ckpt`` stays the last good state. Under DDP the decision is
    shared, so every rank stops together instead of one rank waiting forever in an all-reduce.
    """

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        value = float(loss.detach().float().reshape(-1)[0]) if loss.numel() else math.nan
        saved = [getattr(c, attr, "") for attr in ("last_model_path", "best_model_path") for c in trainer.checkpoint_callbacks]
        last = next((path for path in saved if path), "")
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx + 1})"
        resume = f"; the last good checkpoint is {last} (resume with ckpt_path=last hydra.run.dir=<this run>)" if last else ""
        raise NonFiniteLossError(
            f"the training loss became {value} at {where}{resume}. "
            "Lower the learning rate (task.base_lr=...) or enable gradient clipping (trainer.gradient_clip_val=1.0)"
        )
