"""VisionTask: the LightningModule base shared by all tasks -- optimiser, LR scaling and per-step schedule."""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vision_mamba.tasks.optim import build_param_groups, warmup_schedule
from vision_mamba.utils.errors import UserError
from vision_mamba.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)
NET_ARCHITECTURE_KEY = "net_architecture"  # the network's name, kept in each checkpoint for error messages


class VisionTask(LightningModule):
    """Owns the network, the optimiser and the schedule; subclasses own the loss, the steps and the metrics.

    The learning rate is ``base_lr * global_batch / base_batch_size`` (the DeiT/Vim linear scaling rule) when
    ``base_batch_size`` is set. The schedule is stepped every optimiser step: linear warm-up over
    ``warmup_epochs`` (or ``warmup_steps``), then ``schedule.kind`` decay.

    ``compile``: ``auto`` (on when training on CUDA), ``true`` or ``false``: the network runs through torch.compile
    (its parameters keep their names), with CUDA graphs by default on CUDA (``compile_mode``, default
    ``reduce-overhead`` on CUDA: the launches of a step replayed as one graph per input shape); the first step's
    time, compilation included, is logged. Subclasses whose network sees varying shapes compile only the part that
    does not (``modules_to_compile``).
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
        compile: bool | str = "auto",
        compile_mode: str | None = None,
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

    cuda_graphs = True  # the compiled modules see fixed shapes: CUDA graphs by default on CUDA
    _compiled = False  # configure_model has compiled the network (it runs again on each fit/validate/test)
    _time_next_step = False  # just compiled: the next training step's time, compilation included, is logged
    _first_step_start: float | None = None  # perf_counter at that step's start, until it is logged

    def compile_enabled(self) -> bool:
        setting = str(self.hparams.compile).lower()  # YAML gives true/false as booleans
        if setting not in ("auto", "true", "false"):
            raise ValueError(f"task.compile must be auto, true or false; got {self.hparams.compile!r}")
        if setting == "auto":  # called by the trainer (configure_model), which knows the device
            return self.trainer.strategy.root_device.type == "cuda"
        return setting == "true"

    def modules_to_compile(self) -> list[nn.Module]:
        """The modules torch.compile compiles in place (the whole network by default)."""
        return [self.net]

    def configure_model(self) -> None:
        if self._compiled or not self.compile_enabled():
            return
        cuda = self.trainer.strategy.root_device.type == "cuda"
        mode = self.hparams.compile_mode or ("reduce-overhead" if cuda and self.cuda_graphs else None)
        for module in self.modules_to_compile():
            module.compile(mode=mode)
        self._compiled = self._time_next_step = True
        log.info(f"torch.compile ({mode or 'default'} mode): the first step includes the compilation")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._time_next_step:
            self._time_next_step = False
            self._first_step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._first_step_start is not None:
            seconds = time.perf_counter() - self._first_step_start
            self._first_step_start = None  # reported once
            log.info(f"first training step (torch.compile included): {seconds:.1f} s")
            self.log("compile/first_step_s", seconds, rank_zero_only=True)

    def global_batch_size(self) -> int | None:
        batch = getattr(self.trainer.datamodule, "batch_size", None)  # no datamodule: loaders given to fit()
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
        factor = warmup_schedule(total, int(warmup_steps), **cfg)
        scheduler = LambdaLR(optimizer, lr_lambda=factor)
        self.print_lr_summary(lr, total, int(warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
        log.info(
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
    layers = {k.split(".layers.")[1].split(".")[0] for k in state if ".layers." in k}  # a task's keys: net.layers.N
    if layers:
        sizes.append(f"depth {len(layers)}")
    head = state.get("net.head.weight")
    if head is not None:
        sizes.append(f"{head.shape[0]} classes")
    return f"{architecture or 'network'}" + (f" ({', '.join(sizes)})" if sizes else "")

