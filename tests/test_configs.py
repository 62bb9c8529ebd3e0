"""Every config composes, passes the up-front checks and (the defaults) instantiates; each config mistake is named."""

from __future__ import annotations

import os
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


# ---- checked up front: vision_mamba.config_checks ------------------------------------------------------------------

BASES = {
    "digits": [],
    "imagenet": ["data=imagenet", "data.root=/data/imagenet", "trainer=cpu"],
    "shapes_seg": ["experiment=shapes_seg"],
    "shapes_det": ["experiment=shapes_det"],
}


@pytest.fixture(scope="module")
def base_configs() -> dict:
    return {name: compose_config("train.yaml", overrides) for name, overrides in BASES.items()}


def config_problem(cfg, **changes) -> str | None:
    """check_config's message for ``cfg`` with ``changes`` (dotted keys written with __), or None when it passes."""
    from vision_mamba.config_checks import ConfigError, check_config

    cfg = cfg.copy()
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False, force_add=True)
    try:
        check_config(cfg)
    except ConfigError as e:
        assert "\n" not in str(e), "one line"
        return str(e)
    return None


# (base config, changes, what the message must say); every one must be the only problem reported
MISTAKES = [
    ("digits", {"task__base_lr": -1e-3}, ["task.base_lr=-0.001 must be a number > 0"]),
    ("digits", {"task__base_lr": 0}, ["task.base_lr=0 must be a number > 0"]),
    ("digits", {"task__weight_decay": -0.05}, ["task.weight_decay=-0.05 must be a number >= 0"]),
    ("shapes_seg", {"task__layer_decay": 1.5}, ["task.layer_decay=1.5 must be in (0, 1]"]),
    ("digits", {"task__base_batch_size": 0}, ["task.base_batch_size=0"]),
    ("digits", {"model__scan": "zigzag"}, ["model.scan=zigzag is not a scan pattern", "bidirectional, cross"]),
    ("digits", {"model__scan_backend": "cuda"}, ["model.scan_backend=cuda", "auto, triton, torch, ref"]),
    ("digits", {"task__compile": "yes"}, ["task.compile=yes must be auto, true or false"]),
    ("digits", {"model__drop_path_rate": 1.0}, ["model.drop_path_rate=1.0 must be in [0, 1)"]),
    ("digits", {"task__label_smoothing": -0.1}, ["task.label_smoothing=-0.1"]),
    ("imagenet", {"task__mixup__prob": 1.5}, ["task.mixup.prob=1.5 must be a probability in [0, 1]"]),
    ("imagenet", {"task__mixup__switch_prob": -0.5}, ["task.mixup.switch_prob=-0.5"]),
    ("imagenet", {"task__mixup__mixup_alpha": -1}, ["task.mixup.mixup_alpha=-1 must be a number >= 0"]),
    ("imagenet", {"data__train_transform__re_prob": 2}, ["data.train_transform.re_prob=2 must be a probability"]),
    ("imagenet", {"data__train_transform__hflip": 1.5}, ["data.train_transform.hflip=1.5"]),
    ("imagenet", {"data__train_transform__scale": [0.9, 0.1]}, ["data.train_transform.scale=[0.9, 0.1]", "low <= high"]),
    ("imagenet", {"data__crop_pct": 0}, ["data.crop_pct=0 must be in (0, 1]"]),
    ("digits", {"data__img_size": 0}, ["data.img_size=0 must be a size in pixels > 0"]),  # not model.img_size too
    ("shapes_seg", {"data__val_batch_size": 0}, ["data.val_batch_size=0 must be a whole number > 0"]),
    ("shapes_seg", {"task__inference__stride": 100}, ["task.inference.stride=100 leaves pixels", "crop_size=64"]),
    ("shapes_det", {"task__draw_score_threshold": 2}, ["task.draw_score_threshold=2 must be a probability"]),
    ("digits", {"trainer__max_epochs": -2}, ["trainer.max_epochs=-2"]),
    ("digits", {"trainer__accumulate_grad_batches": 0}, ["trainer.accumulate_grad_batches=0"]),
    ("digits", {"trainer__limit_val_batches": -1}, ["trainer.limit_val_batches=-1"]),
    # Mixup needs an even batch on every device (the per-device batch, not the global one)
    ("imagenet", {"data__batch_size": 7}, ["data.batch_size=7 gives 7 images per device", "data.batch_size=8",
                                           "task.mixup=null"]),
    ("imagenet", {"data__batch_size": 1022, "trainer__devices": 2}, ["1022 over 2 processes gives 511 images per device",
                                                                     "data.batch_size=1024"]),
    # the warm-up against the run's length
    ("imagenet", {"trainer__max_epochs": 5}, ["task.schedule.warmup_epochs=5 covers the whole run (trainer.max_epochs=5)"]),
    ("shapes_seg", {"trainer__max_steps": 50}, ["task.schedule.warmup_steps=50 covers the whole run (trainer.max_steps=50)"]),
    # the schedule and the metrics
    ("digits", {"task__schedule__kind": "linear"}, ["task.schedule: unknown schedule kind 'linear'", "cosine"]),
    ("digits", {"task__schedule__start": 3}, ["task.schedule: unknown option 'start'"]),
    ("digits", {"optimized_metric": "val/acc"}, ["optimized_metric=val/acc is not a metric", "val/acc1_best",
                                                 "test/acc5"]),
    ("shapes_seg", {"task__monitor": "val/miou"}, ["task.monitor=val/miou is not a metric task=segmentation logs",
                                                   "val/mIoU,"]),
    ("shapes_det", {"callbacks__model_checkpoint__monitor": "val/mAP"}, ["callbacks.model_checkpoint.monitor=val/mAP",
                                                                        "val/bbox_mAP,", "val/segm_mAP_75"]),
    ("digits", {"task__monitor_mode": "maximum"}, ["task.monitor_mode=maximum must be min or max"]),
    ("digits", {"trainer__accelerator": "gpu"}, ["trainer.accelerator=gpu (trainer=default) needs a CUDA GPU", "use trainer=cpu",
                                                 "trainer=ddp_cpu"]),
]


@pytest.mark.parametrize(("base", "changes", "needles"), MISTAKES, ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_config_mistakes_are_one_line_naming_the_key(base_configs, monkeypatch, base, changes, needles) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = config_problem(base_configs[base], **changes)
    assert message is not None, f"{changes} passed the checks"
    assert "problems in the config" not in message, message
    for needle in needles:
        assert needle in message, message


def test_several_mistakes_are_reported_together(base_configs) -> None:
    message = config_problem(base_configs["digits"], task__base_lr=-1, model__scan="zigzag")
    assert message.startswith("2 problems in the config: ") and "task.base_lr=-1" in message and "model.scan=zigzag" in message


@pytest.mark.parametrize("changes", [
    {},
    {"trainer__max_epochs": 0},  # nothing trains: it ends cleanly without a metric (see test_user_errors)
    {"trainer__max_epochs": 3, "trainer__limit_train_batches": 2},  # a short debugging run keeps the recipe's warm-up
    {"trainer__fast_dev_run": True, "trainer__max_epochs": 1},
    {"data__batch_size": 7, "task__mixup": None},
    {"data__batch_size": 1024, "trainer__devices": 2},
    {"task__mixup__mixup_alpha": 0.0, "task__mixup__cutmix_alpha": 0.0, "data__batch_size": 7},  # Mixup off
], ids=str)
def test_sensible_changes_pass(base_configs, changes) -> None:
    assert config_problem(base_configs["imagenet"], **changes) is None


def test_a_task_on_the_wrong_kind_of_data_names_the_demo_experiment() -> None:
    message = config_problem(compose_config("train.yaml", ["task=segmentation"]))
    assert "task=segmentation needs segmentation data but data=digits holds classification data" in message
    assert "experiment=shapes_seg" in message
    message = config_problem(compose_config("train.yaml", ["experiment=shapes_det", "data=shapes_seg"]))
    assert "task=detection needs detection data" in message and "experiment=shapes_det" in message


def test_an_output_folder_that_cannot_be_written_is_named(base_configs, tmp_path, monkeypatch) -> None:
    from vision_mamba.utils import hydra_callbacks

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    message = config_problem(base_configs["digits"], paths__output_dir=str(a_file / "run"))
    assert f"paths.output_dir={a_file}/run cannot be written ({a_file} is a file, not a folder)" in message
    # a resumed run whose checkpoints/ became read-only would fail at its first checkpoint, after an epoch
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(hydra_callbacks.os, "access", lambda p, mode: Path(p).name != "checkpoints" and real_access(p, mode))
    message = config_problem(base_configs["digits"], paths__output_dir=str(run))
    assert message == (f"callbacks.model_checkpoint.dirpath={run}/checkpoints cannot be written ({run}/checkpoints is not "
                       "writable): point it (or paths.log_dir) at a writable folder")


SHIPPED = [["experiment=" + e, "data.root=/data", "model.pretrained=/ckpt.pth"] for e in EXPERIMENTS] + [
    [], ["experiment=shapes_seg"], ["experiment=shapes_det"], ["data=imagenet", "data.root=/data", "model=vim_small"],
    ["task=segmentation", "data=ade20k", "data.root=/data", "model=vim_tiny"],
    ["task=detection", "data=coco", "data.root=/data", "model=vim_tiny"],
    *(["trainer=" + t] for t in TRAINERS),
]


@pytest.mark.parametrize("overrides", SHIPPED, ids=" ".join)
def test_every_shipped_config_passes_the_checks(overrides, monkeypatch) -> None:
    """On a machine with 8 GPUs, every experiment, task/data pairing and trainer is accepted as shipped."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert config_problem(compose_config("train.yaml", overrides)) is None
    if overrides == []:
        assert config_problem(compose_config("eval.yaml", ["ckpt_path=x.ckpt"])) is None


@pytest.mark.parametrize("overrides", [["logger=csv"], ["experiment=shapes_seg", "logger=csv", "data.num_train=8",
                                                          "data.num_val=4", "data.batch_size=4", "data.val_batch_size=4"]],
                         ids=["classification", "segmentation"])
def test_the_metric_names_checked_are_the_ones_the_task_logs(overrides, tmp_path, data_dir) -> None:
    """check_config's list of a task's metrics against what one short run of that task really logs."""
    from helpers import make_fast, run_train
    from omegaconf import open_dict

    from vision_mamba.config_checks import logged_metrics

    cfg = make_fast(compose_config("train.yaml", [*overrides, "model.scan_backend=torch"]), tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = cfg.trainer.limit_val_batches = cfg.trainer.limit_test_batches = 1
        if "num_train" in cfg.data:  # the embedded shapes at a test size: written for this test alone
            cfg.data.root = str(tmp_path / "shapes")
    metrics = run_train(cfg)
    assert set(metrics) == logged_metrics(cfg)
