"""Evaluate a checkpoint: `python src/eval.py ckpt_path=PATH` (model/data/task default to the run's own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from vision_mamba.checkpointing import SafeCheckpointIO, check_checkpoint_file
from vision_mamba.utils import RankedLogger, UserError, extras, instantiate_loggers, log_hyperparameters, task_wrapper
from vision_mamba.utils.banner import run_banner
from vision_mamba.utils.utils import exit_on_user_error

log = RankedLogger(__name__, rank_zero_only=True)

RUN_GROUPS = ("model", "data", "task")


def run_config_of(ckpt_path: Path) -> DictConfig | None:
    """The config a checkpoint's run was trained with: <run>/.hydra/config.yaml next to <run>/checkpoints/."""
    candidate = ckpt_path.resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(candidate) if candidate.is_file() else None


def adopt_run_config(cfg: DictConfig) -> None:
    """Replace model/data/task with the training run's, except the groups given on the command line."""
    run_cfg = run_config_of(Path(cfg.ckpt_path))
    if run_cfg is None:
        log.info("No run config next to the checkpoint: using model/data/task from the command line/defaults")
        return
    from hydra.core.hydra_config import HydraConfig

    given = {o.split("=", 1)[0].lstrip("+~").split(".")[0] for o in HydraConfig.get().overrides.task}
    with open_dict(cfg):
        for group in RUN_GROUPS:
            if group not in given and group in run_cfg:
                cfg[group] = run_cfg[group]
    log.info(f"Using {', '.join(g for g in RUN_GROUPS if g not in given)} config from the checkpoint's run")


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test a checkpoint on the datamodule's test split (the validation split for ImageNet)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model)
    model = hydra.utils.instantiate(cfg.task, net=net)
    logger = instantiate_loggers(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=logger, plugins=[SafeCheckpointIO()])
    object_dict = {"cfg": cfg, "datamodule": datamodule, "model": model, "logger": logger, "trainer": trainer}
    if logger:
        log_hyperparameters(object_dict)
    ckpt_path = cfg.ckpt_path or None  # None: the weights model.pretrained loaded (e.g. an official checkpoint)
    log.info(f"Testing {ckpt_path or 'model.pretrained=' + str(cfg.model.get('pretrained'))}")
    # read by the trainer's SafeCheckpointIO (weights_only, see vision_mamba.checkpointing)
    trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    return dict(trainer.callback_metrics), object_dict


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    pretrained = cfg.get("model", {}).get("pretrained")
    if OmegaConf.is_missing(cfg, "ckpt_path") or (not cfg.ckpt_path and not pretrained):
        raise UserError(
            "ckpt_path is required: python src/eval.py ckpt_path=logs/train/runs/<run>/checkpoints/<file>.ckpt "
            "(or ckpt_path=null model.pretrained=<official .pth> to evaluate released weights)"
        )
    if cfg.ckpt_path and not Path(cfg.ckpt_path).exists():
        raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist: give a .ckpt file written by train.py")
    if cfg.ckpt_path:
        check_checkpoint_file(cfg.ckpt_path)
    if cfg.ckpt_path and cfg.get("use_run_config"):
        adopt_run_config(cfg)
    log.info(run_banner(cfg))
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
