"""ClassificationTask: the DeiT/Vim ImageNet recipe -- Mixup/CutMix, label smoothing, EMA, top-1/top-5."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vision_mamba.tasks.base import VisionTask


class ClassificationTask(VisionTask):
    """Image classification. ``net`` maps images (B, 3, H, W) to logits (B, num_classes).

    Logged: ``train/loss``; ``val/loss``, ``val/acc1``, ``val/acc5``, ``val/acc1_best`` and, with EMA,
    ``val/acc1_ema``; the same under ``test/``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        label_smoothing: float = 0.1,
        mixup: dict[str, Any] | None = None,
        ema_decay: float | None = 0.99996,
        ema_warmup: bool = False,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        kwargs.setdefault("optimized_metric", "val/acc1_best")
        kwargs.setdefault("monitor", "val/acc1")
        super().__init__(net=net, **kwargs)
        mixup = dict(mixup or {})
        active = mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0
        self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=num_classes) if active else None
        # Mixup produces soft targets that already carry the smoothing
        self.train_criterion = SoftTargetCrossEntropy() if active else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(net, decay=ema_decay, use_warmup=ema_warmup) if ema_decay else None
        if self.ema is not None:
            # updated by copying, never by gradients: left trainable, DDP would find its parameters unused
            self.ema.requires_grad_(False)

        top5 = min(5, num_classes)
        self.train_loss = MeanMetric()
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            self.metrics[f"{stage}_loss"] = MeanMetric()
            self.metrics[f"{stage}_acc1"] = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
            self.metrics[f"{stage}_acc5"] = MulticlassAccuracy(num_classes=num_classes, top_k=top5, average="micro")
            if self.ema is not None:
                self.metrics[f"{stage}_acc1_ema"] = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_acc1_best = MaxMetric()
        # saved in checkpoints, so a resumed run keeps its best-so-far (never reset: the sanity-check validation
        # does not update it, see on_validation_epoch_end)
        self.val_acc1_best.persistent(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_criterion(self(images), targets)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA follows every optimiser step, before any callback's on_train_batch_end (the interval and
        # preemption checkpoints are written there and must hold the EMA of the weights they hold)
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            # timm's step: the optimiser steps taken, this one included (global_step counts it only once this hook
            # returns); the first update copies the weights, the later ones average
            self.ema.update(self.net, step=self.global_step + 1)

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, targets = batch
        logits = self(images)
        m = self.metrics
        # weighted by batch size: the epoch loss is the per-sample mean, also with a smaller last batch
        m[f"{stage}_loss"](self.eval_criterion(logits.float(), targets), weight=len(targets))
        m[f"{stage}_acc1"](logits, targets)
        m[f"{stage}_acc5"](logits, targets)
        self.log(f"{stage}/loss", m[f"{stage}_loss"], on_epoch=True, prog_bar=False, sync_dist=True)
        self.log(f"{stage}/acc1", m[f"{stage}_acc1"], on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc5", m[f"{stage}_acc5"], on_epoch=True)
        if self.ema is not None:
            m[f"{stage}_acc1_ema"](self.ema(images), targets)
            self.log(f"{stage}/acc1_ema", m[f"{stage}_acc1_ema"], on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc1_best(self.metrics["val_acc1"].compute())
        self.log("val/acc1_best", self.val_acc1_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)
