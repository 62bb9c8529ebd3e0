"""Train a model: `python src/train.py [model=vim_small] [data=imagenet data.root=DIR] [task=...] [key=value ...]`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from vision_mamba.checkpointing import SafeCheckpointIO, check_checkpoint_file
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

LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


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


def build_trainer(cfg: DictConfig, callbacks: list[Callback], logger: list[Logger], **extra: Any) -> Trainer:
    # trainer configs may add plugins (e.g. trainer=slurm's SLURMEnvironment); the safe checkpoint IO is always on
    plugins = [SafeCheckpointIO(), *(hydra.utils.instantiate(p) for p in cfg.trainer.get("plugins") or [])]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins, **extra)


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the task, then test the best checkpoint. Returns the metrics and the objects it built."""
    check_ckpt_path(cfg.get("ckpt_path"), cfg.paths.get("output_dir"))
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
        ckpt_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
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


def summarize(cfg: DictConfig, trainer: Trainer, metrics: dict[str, Any]) -> None:
    """Tell the user where everything went and the headline numbers."""
    ckpt = trainer.checkpoint_callback
    shown = {k: float(v) for k, v in metrics.items() if k.startswith(("val/", "test/")) and getattr(v, "numel", lambda: 1)() == 1}
    log.info("Run finished. Output folder: " + str(cfg.paths.output_dir))
    if ckpt is not None:
        log.info(f"  checkpoints: best {ckpt.best_model_path or '-'} | last {ckpt.last_model_path or '-'}")
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
    main()
