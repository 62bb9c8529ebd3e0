"""VisionTask: the LightningModule base shared by all tasks -- optimiser, LR scaling and per-step schedule."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vision_mamba.tasks.optim import build_param_groups, warmup_schedule
from vision_mamba.utils.errors import UserError

NET_ARCHITECTURE_KEY = "net_architecture"  # the network's name, kept in each checkpoint for error messages


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
    ) -> None:
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
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup_steps = cfg.pop("warmup_steps", None)
        if warmup_steps is None:
            warmup_steps = round(cfg.pop("warmup_epochs", 0) * steps_per_epoch)
        cfg.pop("warmup_epochs", None)
        cfg.setdefault("kind", "cosine")
        if "milestones" in cfg:
            cfg["milestones"] = tuple(cfg["milestones"])
        factor = warmup_schedule(total, int(warmup_steps), **cfg)
        scheduler = LambdaLR(optimizer, lr_lambda=factor)
        self.print_lr_summary(lr, total, int(warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def print_lr_summary(self, lr: float, total: int, warmup: int) -> None:
        from vision_mamba.utils.pylogger import RankedLogger

        RankedLogger(__name__).info(
            f"optimiser: lr {lr:.3g} (base {self.hparams.base_lr:g} x batch {self.global_batch_size()} / "
            f"{self.hparams.base_batch_size}), {total} steps, {warmup} warm-up"
        )

    # --- checkpoints --------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[NET_ARCHITECTURE_KEY] = _architecture(self.net)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose weights do not fit this network in one line (what it was made for, what this
        run builds, the first differences) instead of Lightning's list of every mismatched tensor."""
        if not self.strict_loading:
            return
        theirs, ours = checkpoint.get("state_dict", {}), self.state_dict()
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in theirs.items()
                  if k in ours and hasattr(v, "shape") and v.shape != ours[k].shape]
        missing, unexpected = [k for k in ours if k not in theirs], [k for k in theirs if k not in ours]
        if not (shapes or missing or unexpected):
            return
        problems = [f"{len(shapes)} of {len(ours)} tensors differ in shape, e.g. {', '.join(shapes[:3])}"] if shapes else []
        problems += [f"{len(missing)} tensors of this model are missing, e.g. {', '.join(missing[:3])}"] if missing else []
        problems += [f"{len(unexpected)} tensors the model does not have, e.g. {', '.join(unexpected[:3])}"] if unexpected else []
        path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"  # no trainer: load_from_checkpoint
        raise UserError(
            f"{path}: checkpoint of a {_describe(checkpoint.get(NET_ARCHITECTURE_KEY), theirs)}, "
            f"this run builds a {_describe(_architecture(self.net), ours)}: {'; '.join(problems)}. Give the model "
            "and data settings it was trained with (resuming inside its run folder does: hydra.run.dir=<run> "
            "ckpt_path=last), or load only its network weights with model.pretrained=<checkpoint>"
        )


def _architecture(net: nn.Module) -> str:
    """timm's architecture name of the network (or its backbone's), else its class name."""
    for module in (net, getattr(net, "backbone", None)):
        name = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
        if name:
            return name
    return type(net).__name__


def _describe(architecture: str | None, state: dict[str, Any]) -> str:
    """``vim_small_patch16_224 (embed 384, depth 24, 1000 classes)``, the sizes read from the weights' shapes."""
    sizes = []
    embed = next((v.shape[-1] for k, v in state.items() if k.endswith("pos_embed")), None)
    if embed is not None:
        sizes.append(f"embed {embed}")
    layers = {k.split("layers.")[1].split(".")[0] for k in state if ".layers." in k or k.startswith("layers.")}
    if layers:
        sizes.append(f"depth {len(layers)}")
    head = state.get("net.head.weight")
    if head is not None:
        sizes.append(f"{head.shape[0]} classes")
    return f"{architecture or 'network'}" + (f" ({', '.join(sizes)})" if sizes else "")

