"""build_trainer: the Lightning Trainer of every entry point -- the trainer config, its plugins, safe checkpoint IO."""

from __future__ import annotations

from typing import Any

import hydra
from lightning import Callback, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from vision_mamba.checkpointing import SafeCheckpointIO


def build_trainer(cfg: DictConfig, callbacks: list[Callback] | None = None, logger: list[Logger] | None = None,
                  **extra: Any) -> Trainer:
    """``cfg.trainer`` instantiated with the plugins it lists (e.g. ``trainer=slurm``'s SLURMEnvironment) and the
    project's checkpoint IO: checkpoints written atomically as plain data and read only with weights_only."""
    plugins = [SafeCheckpointIO(), *(hydra.utils.instantiate(p) for p in cfg.trainer.get("plugins") or [])]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks or [], logger=logger, plugins=plugins, **extra)
