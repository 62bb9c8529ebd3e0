"""Evaluate a checkpoint: `python src/eval.py ckpt_path=PATH` (model/data/task default to the run's own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from vision_mamba.checkpointing import RECORD, check_checkpoint_file, run_folder_of
from vision_mamba.config_checks import check_config
from vision_mamba.trainer import build_trainer
from vision_mamba.utils import RankedLogger, UserError, extras, instantiate_loggers, log_hyperparameters, task_wrapper
from vision_mamba.utils.banner import run_banner
from vision_mamba.utils.utils import exit_on_user_error

log = RankedLogger(__name__, rank_zero_only=True)

RUN_GROUPS = ("model", "data", "task")


def run_config_of(ckpt_path: Path) -> DictConfig | None:
    """The config a checkpoint's run was trained with: <run>/.hydra/config.yaml next to <run>/checkpoints/ (the
    record of the run's first start; each resume records its own beside it and leaves this one as it was)."""
    run = run_folder_of(ckpt_path)
    return OmegaConf.load(run / RECORD / "config.yaml") if run and (run / RECORD / "config.yaml").is_file() else None


def adopt_run_config(cfg: DictConfig) -> None:
    """Replace model/data/task with the training run's, except a group chosen on the command line (``data=...``);
    the command line's values inside an adopted group (``data.root=...``, ``data.num_workers=0``) apply on top."""
    run_cfg = run_config_of(Path(cfg.ckpt_path))
    if run_cfg is None:
        log.info("No run config next to the checkpoint: using model/data/task from the command line/defaults")
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    adopted = [g for g in RUN_GROUPS if g in run_cfg and g not in {o.key_or_group for o in overrides}]
    with open_dict(cfg):
        for group in adopted:
            cfg[group] = run_cfg[group]
        for o in overrides:
            if o.key_or_group.split(".")[0] in adopted and "." in o.key_or_group and not o.is_delete():
                OmegaConf.update(cfg, o.key_or_group, o.value(), force_add=True)
    log.info(f"Using {', '.join(adopted)} config from the checkpoint's run")


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test a checkpoint on the datamodule's test split (the validation split for ImageNet)."""
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model)
    model = hydra.utils.instantiate(cfg.task, net=net)
    logger = instantiate_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg, logger=logger)
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
