"""Every config composes, and the default ones instantiate into working objects."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from helpers import CONF_DIR, compose_config
from omegaconf import OmegaConf

MODELS = sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in Path(CONF_DIR, "trainer").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in Path(CONF_DIR, "logger").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))


def test_default_train_config_is_digits_on_a_small_vim() -> None:
    cfg = compose_config("train.yaml")
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.model_name == "vim_digits"
    assert cfg.hydra.runtime.choices.recipe == "digits"
    assert cfg.optimized_metric == "val/acc1_best"
    OmegaConf.resolve(cfg.task)  # no dangling interpolations


@pytest.mark.parametrize("model", MODELS)
def test_model_configs_compose(model: str) -> None:
    cfg = compose_config("train.yaml", [f"model={model}", "data=imagenet", "data.root=/nonexistent"])
    assert cfg.model.model_name
    assert cfg.model.num_classes == 1000 and cfg.model.img_size == 224


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_configs_compose(trainer: str) -> None:
    cfg = compose_config("train.yaml", [f"trainer={trainer}"])
    assert cfg.trainer._target_.endswith("Trainer")


@pytest.mark.parametrize("logger", LOGGERS)
def test_logger_configs_compose(logger: str) -> None:
    cfg = compose_config("train.yaml", [f"logger={logger}"])
    assert all("_target_" in v for v in cfg.logger.values())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_compose(experiment: str) -> None:
    cfg = compose_config("train.yaml", [f"experiment={experiment}"])
    assert cfg.task._target_


def test_imagenet_recipe_scales_lr_with_global_batch() -> None:
    cfg = compose_config("train.yaml", ["data=imagenet", "data.root=/x", "model=vim_small"])
    assert cfg.data.batch_size == 1024 and cfg.task.base_batch_size == 512 and cfg.task.base_lr == 5e-4
    assert cfg.task.mixup.mixup_alpha == 0.8 and cfg.task.mixup.cutmix_alpha == 1.0
    assert cfg.task.label_smoothing == 0.1 and cfg.task.ema_decay == 0.99996
    assert cfg.data.train_transform.auto_augment == "rand-m9-mstd0.5-inc1"
    assert cfg.trainer.max_epochs == 300


def test_default_objects_instantiate(tmp_path) -> None:
    cfg = compose_config("train.yaml")
    dm = hydra.utils.instantiate(cfg.data, root=str(tmp_path / "digits"))
    net = hydra.utils.instantiate(cfg.model)
    task = hydra.utils.instantiate(cfg.task, net=net)
    assert task.net is net and dm.num_classes == 10
