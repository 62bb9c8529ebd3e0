"""Build the callbacks and loggers listed in the config."""

from __future__ import annotations

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from vision_mamba.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


def _instantiate_group(group: DictConfig | None, kind: str) -> list:
    objects: list = []
    if not group:
        log.warning(f"No {kind} configs found! Skipping...")
        return objects
    if not isinstance(group, DictConfig):
        raise TypeError(f"{kind} config must be a DictConfig!")
    for _, conf in group.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info(f"Instantiating {kind[:-1]} <{conf._target_}>")
            objects.append(hydra.utils.instantiate(conf))
    return objects


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every entry of ``cfg.callbacks`` that has a ``_target_``."""
    return _instantiate_group(callbacks_cfg, "callbacks")


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every entry of ``cfg.logger`` that has a ``_target_``."""
    return _instantiate_group(logger_cfg, "loggers")
