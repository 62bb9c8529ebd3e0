"""Train a model: `python src/train.py [model=vim_small] [data=imagenet data.root=DIR] [task=...] [key=value ...]`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning import LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig

from vision_mamba.checkpointing import LIGHTNING_CKPT_KEYWORDS, check_checkpoint_file, resume_argv
from vision_mamba.config_checks import check_config
from vision_mamba.trainer import build_trainer
from vision_mamba.utils import (
    RankedLogger,
    UserError,
    extras,
    get_metric_value,
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
    task_wrapper,
)
from vision_mamba.utils.banner import run_banner
from vision_mamba.utils.hydra_callbacks import pin_ddp_relaunch, pin_run_id_from_launcher
from vision_mamba.utils.utils import exit_on_user_error

log = RankedLogger(__name__, rank_zero_only=True)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def check_ckpt_path(ckpt_path: str | None, output_dir: str | None = None) -> None:
    """Stop before anything is built when the checkpoint to resume from is missing or could not be loaded."""
    if ckpt_path and ckpt_path not in LIGHTNING_CKPT_KEYWORDS:
        if not Path(ckpt_path).exists():
            raise UserError(
                f"ckpt_path={ckpt_path} does not exist: give a .ckpt written by train.py "
                "(they are in logs/train/runs/<run>/checkpoints/), or `last` with hydra.run.dir=<the run folder>"
            )
        check_checkpoint_file(ckpt_path)
    if ckpt_path == "last" and output_dir:
        last = sorted(Path(output_dir, "checkpoints").glob("last*.ckpt"))
        if not last:  # Lightning would warn and silently start from scratch in a new folder
            raise UserError(
                f"ckpt_path=last found no checkpoints/last.ckpt in {output_dir}: resume inside the old run with "
                "hydra.run.dir=<the run folder> ckpt_path=last (e.g. hydra.run.dir=logs/train/runs/2025-01-31_12-00-00)"
            )
        for path in last:
            check_checkpoint_file(path)


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the task, then test the best checkpoint. Returns the metrics and the objects it built."""
    check_ckpt_path(cfg.get("ckpt_path"), cfg.paths.get("output_dir"))
    check_config(cfg)
    if cfg.get("ckpt_path"):
        log_resume(cfg.ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info(f"Instantiating model <{cfg.model.get('model_name', cfg.model._target_)}>")
    net: torch.nn.Module = hydra.utils.instantiate(cfg.model)
    log.info(f"Instantiating task <{cfg.task._target_}>")
    model: LightningModule = hydra.utils.instantiate(cfg.task, net=net)

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    logger = instantiate_loggers(cfg.get("logger"))
    extra = {}
    if cfg.data.get("repeated_aug"):  # the RepeatAugSampler shards by itself
        extra["use_distributed_sampler"] = False
    pin_ddp_relaunch()  # DDP children (ranks 1..) must run this job, in this folder
    trainer = build_trainer(cfg, callbacks, logger, **extra)

    object_dict = {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks, "logger": logger, "trainer": trainer}
    if logger:
        log_hyperparameters(object_dict)

    # every checkpoint is read by the trainer's SafeCheckpointIO (weights_only, see vision_mamba.checkpointing)
    if cfg.get("train"):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_metrics = dict(trainer.callback_metrics)

    if cfg.get("test"):
        ckpt_path = saved_checkpoint(trainer, "best_model_path")
        if not ckpt_path:
            log.warning("Best ckpt not found! Using current weights for testing...")
            ckpt_path = None
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        log.info(f"Best ckpt path: {ckpt_path}")
    test_metrics = dict(trainer.callback_metrics)

    summarize(cfg, trainer, {**train_metrics, **test_metrics})
    end_distributed(trainer)
    return {**train_metrics, **test_metrics}, object_dict


def end_distributed(trainer: Trainer) -> None:
    """Close the process group this run opened, so the next job of a multirun can open its own."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if getattr(getattr(trainer.strategy, "launcher", None), "procs", None):
        # this process launched the other ranks and Lightning left their variables in our environment: with
        # LOCAL_RANK set, the next job would think torchrun made its processes and wait for ranks that never come
        for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(key, None)


def log_resume(ckpt_path: str) -> None:
    """Say what a resume composed: inside a run folder, the run's recorded choices and overrides come first."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        log.info(f"Resuming from ckpt_path={ckpt_path} with overrides: {' '.join(HydraConfig.get().overrides.task)}")


def saved_checkpoint(trainer: Trainer, attribute: str) -> str:
    """The best (``best_model_path``) or last (``last_model_path``) checkpoint any checkpoint callback saved."""
    return next((path for c in trainer.checkpoint_callbacks if (path := getattr(c, attribute, ""))), "")


def summarize(cfg: DictConfig, trainer: Trainer, metrics: dict[str, Any]) -> None:
    """Tell the user where everything went and the headline numbers."""
    shown = {k: float(v) for k, v in metrics.items() if k.startswith(("val/", "test/")) and getattr(v, "numel", lambda: 1)() == 1}
    log.info("Run finished. Output folder: " + str(cfg.paths.output_dir))
    if trainer.checkpoint_callbacks:
        best, last = saved_checkpoint(trainer, "best_model_path"), saved_checkpoint(trainer, "last_model_path")
        log.info(f"  checkpoints: best {best or '-'} | last {last or '-'}")
    for lg in trainer.loggers:
        log.info(f"  {type(lg).__name__}: {lg.log_dir or lg.save_dir}")
    if shown:
        log.info("  metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    log.info(run_banner(cfg))
    extras(cfg)
    metric_dict, _ = train(cfg)
    return get_metric_value(metric_dict=metric_dict, metric_name=cfg.get("optimized_metric"))


if __name__ == "__main__":
    pin_run_id_from_launcher()  # torchrun/srun processes must agree on one run folder before Hydra names it
    sys.argv = resume_argv(sys.argv, CONFIG_DIR)  # a resume composes the run's own config (vision_mamba.checkpointing)
    main()
