"""VisionTask: the LightningModule base shared by all tasks -- optimiser, LR scaling and per-step schedule."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vision_mamba.tasks.optim import build_param_groups, warmup_schedule
from vision_mamba.utils.errors import UserError


class VisionTask(LightningModule):
    """Owns the network, the optimiser and the schedule; subclasses own the loss, the steps and the metrics.

    The learning rate is ``base_lr * global_batch / base_batch_size`` (the DeiT/Vim linear scaling rule) when
    ``base_batch_size`` is set. The schedule is stepped every optimiser step: linear warm-up over
    ``warmup_epochs`` (or ``warmup_steps``), then ``schedule.kind`` decay.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial | None = None,
        base_lr: float = 5e-4,
        base_batch_size: int | None = 512,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        schedule: dict[str, Any] | None = None,
        compile: bool = False,
        optimized_metric: str | None = None,
        monitor: str | None = None,
        monitor_mode: str = "max",
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        super().__init__()
        # called here (not in subclasses) so Lightning collects the arguments of the whole __init__ chain
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-8)
        self.schedule_cfg = dict(schedule or {})

    def setup(self, stage: str) -> None:
        if self.hparams.get("compile") and stage == "fit":
            self.net = torch.compile(self.net)

    def global_batch_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            return None
        return batch * self.trainer.accumulate_grad_batches

    def learning_rate(self) -> float:
        lr = self.hparams.base_lr
        batch = self.global_batch_size()
        if self.hparams.base_batch_size and batch:
            lr = lr * batch / self.hparams.base_batch_size
        return lr

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.learning_rate()
        groups = build_param_groups(self.net, self.hparams.weight_decay, self.hparams.layer_decay)
        for group in groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer = self.optimizer_factory(params=groups, lr=lr)

        total = int(self.trainer.estimated_stepping_batches)
        cfg = dict(self.schedule_cfg)
        warmup_steps = cfg.pop("warmup_steps", None)
        warmup_epochs = cfg.pop("warmup_epochs", None)
        if warmup_steps is None:
            warmup_steps = round(warmup_epochs * self.optimizer_steps_per_epoch()) if warmup_epochs else 0
        cfg.setdefault("kind", "cosine")
        if "milestones" in cfg:
            cfg["milestones"] = tuple(cfg["milestones"])
        factor = warmup_schedule(total, int(warmup_steps), **cfg)
        scheduler = LambdaLR(optimizer, lr_lambda=factor)
        self.print_lr_summary(lr, total, int(warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def optimizer_steps_per_epoch(self) -> int:
        """Optimiser steps in one training epoch (Lightning also steps on an epoch's last, partial accumulation),
        whether the run is bounded by max_epochs or by max_steps."""
        if self.trainer.train_dataloader is None:  # a max_steps run has not loaded it yet (estimated_stepping_batches)
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        if math.isinf(batches):
            raise UserError("task.schedule.warmup_epochs needs a training loader of known length: "
                            "set task.schedule.warmup_steps instead")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def print_lr_summary(self, lr: float, total: int, warmup: int) -> None:
        from vision_mamba.utils.pylogger import RankedLogger

        RankedLogger(__name__).info(
            f"optimiser: lr {lr:.3g} (base {self.hparams.base_lr:g} x batch {self.global_batch_size()} / "
            f"{self.hparams.base_batch_size}), {total} steps, {warmup} warm-up"
        )
