"""check_config: mistakes in a run's config found before any data is read or model built, reported in one line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vision_mamba.models.mixer import SCAN_PATTERNS
from vision_mamba.models.scan import BACKENDS
from vision_mamba.tasks.optim import warmup_schedule
from vision_mamba.utils.errors import UserError
from vision_mamba.utils.hydra_callbacks import unwritable_reason


class ConfigError(UserError):
    """One or more config values that cannot work; the message names each key, its value and what it must be."""


def check_config(cfg: DictConfig) -> None:
    """Raise a ConfigError listing every problem found in ``cfg`` (a train.yaml or eval.yaml composition).

    Training-only rules (Mixup's even batch, the warm-up against the run's length, the metric names a sweep and the
    checkpoint callback read) apply when ``cfg.train`` is set. Values the datamodules check themselves against the
    data (batch sizes against the split, worker counts, class sets) are left to them.
    """
    training = bool(cfg.get("train"))
    checks = [ranges, scan_choices, schedule_options, devices, task_matches_data, output_folders]
    if training:
        checks += [mixup_batch, warmup_length, metric_names]
    problems = [problem for check in checks for problem in check(cfg)]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config: " + "; ".join(problems))


def select(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``; None where it is absent, ``???`` or cannot resolve yet (reported elsewhere)."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except OmegaConfBaseException:
        return None


# ---- numbers and ranges -------------------------------------------------------------------------------------------


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Rule = tuple[Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: is_number(v) and v > 0, "a number > 0")
POSITIVE_INT: Rule = (lambda v: is_int(v) and v > 0, "a whole number > 0")
NON_NEGATIVE: Rule = (lambda v: is_number(v) and v >= 0, "a number >= 0")
NON_NEGATIVE_INT: Rule = (lambda v: is_int(v) and v >= 0, "a whole number >= 0")
PROBABILITY: Rule = (lambda v: is_number(v) and 0 <= v <= 1, "a probability in [0, 1]")
BELOW_ONE: Rule = (lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)")
FRACTION: Rule = (lambda v: is_number(v) and 0 < v <= 1, "in (0, 1]")
OPEN_FRACTION: Rule = (lambda v: is_number(v) and 0 < v < 1, "in (0, 1)")
EPOCHS: Rule = (lambda v: is_int(v) and v >= -1, "a whole number >= 0 (or -1: no limit)")
SIZE: Rule = (
    lambda v: (is_int(v) and v > 0) or (isinstance(v, list) and len(v) == 2 and all(is_int(x) and x > 0 for x in v)),
    "a size in pixels > 0 (or [height, width])",
)
BATCHES: Rule = (  # Lightning's limit_*_batches: a fraction of the split (float) or a number of batches (int)
    lambda v: (is_int(v) and v >= 0) or (is_number(v) and 0 <= v <= 1),
    "a fraction in [0, 1] or a whole number of batches >= 0",
)
PAIR: Rule = (lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(x) and x > 0 for x in v),
              "two numbers > 0")
ORDERED_PAIR: Rule = (
    lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(x) and x > 0 for x in v) and v[0] <= v[1],
    "[low, high] with 0 < low <= high",
)
AREA_RANGE: Rule = (
    lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
    "[low, high] with 0 < low <= high <= 1 (fractions of the image area)",
)

# key -> the values it accepts; null always means "off" or "the default" and is not checked
RANGES: dict[str, Rule] = {
    # optimisation
    "task.base_lr": POSITIVE,
    "task.base_batch_size": POSITIVE_INT,
    "task.weight_decay": NON_NEGATIVE,
    "task.layer_decay": FRACTION,
    "task.label_smoothing": BELOW_ONE,
    "task.ema_decay": PROBABILITY,
    "task.schedule.warmup_epochs": NON_NEGATIVE,
    "task.schedule.warmup_steps": NON_NEGATIVE_INT,
    "task.schedule.warmup_factor": FRACTION,
    "task.schedule.min_factor": PROBABILITY,
    "task.schedule.gamma": FRACTION,
    "task.schedule.power": POSITIVE,
    # Mixup / CutMix (timm.data.Mixup)
    "task.mixup.mixup_alpha": NON_NEGATIVE,
    "task.mixup.cutmix_alpha": NON_NEGATIVE,
    "task.mixup.prob": PROBABILITY,
    "task.mixup.switch_prob": PROBABILITY,
    # segmentation and detection heads
    "task.aux_weight": NON_NEGATIVE,
    "task.inference.crop_size": SIZE,
    "task.inference.stride": SIZE,
    "task.segmentor.dropout": BELOW_ONE,
    "task.segmentor.channels": POSITIVE_INT,
    "task.segmentor.aux_channels": NON_NEGATIVE_INT,
    "task.detector.out_channels": POSITIVE_INT,
    "task.detector.representation_size": POSITIVE_INT,
    "task.detector.box_detections_per_img": POSITIVE_INT,
    "task.draw_score_threshold": PROBABILITY,
    "task.mask_threshold": PROBABILITY,
    # backbone
    "model.img_size": SIZE,
    "model.drop_path_rate": BELOW_ONE,
    "model.embed_dim": POSITIVE_INT,
    "model.depth": POSITIVE_INT,
    "model.d_state": POSITIVE_INT,
    "model.patch_size": POSITIVE_INT,
    # data and augmentation
    "data.img_size": SIZE,
    "data.image_size": SIZE,
    "data.val_batch_size": POSITIVE_INT,
    "data.eval_batch_size": POSITIVE_INT,
    "data.crop_pct": FRACTION,
    "data.hflip": PROBABILITY,
    "data.train_transform.hflip": PROBABILITY,
    "data.train_transform.vflip": PROBABILITY,
    "data.train_transform.re_prob": PROBABILITY,
    "data.train_transform.re_count": POSITIVE_INT,
    "data.train_transform.scale": AREA_RANGE,
    "data.train_transform.ratio": ORDERED_PAIR,
    "data.scale": PAIR,
    "data.ratio_range": ORDERED_PAIR,
    "data.scale_range": ORDERED_PAIR,
    "data.cat_max_ratio": FRACTION,
    "data.min_box_size": NON_NEGATIVE,
    "data.val_fraction": OPEN_FRACTION,
    "data.num_train": POSITIVE_INT,
    "data.num_val": POSITIVE_INT,
    # the trainer
    "trainer.max_epochs": EPOCHS,
    "trainer.min_epochs": NON_NEGATIVE_INT,
    "trainer.max_steps": EPOCHS,
    "trainer.num_nodes": POSITIVE_INT,
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "trainer.check_val_every_n_epoch": POSITIVE_INT,
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.gradient_clip_val": NON_NEGATIVE,
    "trainer.val_check_interval": BATCHES,
    "trainer.limit_train_batches": BATCHES,
    "trainer.limit_val_batches": BATCHES,
    "trainer.limit_test_batches": BATCHES,
}


def is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def ranges(cfg: DictConfig) -> Iterator[str]:
    for key, (accepts, expected) in RANGES.items():
        value = select(cfg, key)
        # a copy of another key (model.img_size: ${data.img_size}) is reported under that key only
        if value is not None and not accepts(value) and not is_interpolation(cfg, key):
            yield f"{key}={value} must be {expected}"
    crop, stride = select(cfg, "task.inference.crop_size"), select(cfg, "task.inference.stride")
    if is_int(crop) and is_int(stride) and stride > crop:
        yield (f"task.inference.stride={stride} leaves pixels between the windows of task.inference.crop_size={crop}: "
               "use a stride <= the crop")


# ---- choices ------------------------------------------------------------------------------------------------------


def scan_choices(cfg: DictConfig) -> Iterator[str]:
    scan, backend = select(cfg, "model.scan"), select(cfg, "model.scan_backend")
    if scan is not None and scan not in SCAN_PATTERNS:
        yield f"model.scan={scan} is not a scan pattern: use one of {', '.join(sorted(SCAN_PATTERNS))}"
    if backend is not None and backend not in BACKENDS:
        yield f"model.scan_backend={backend} is not a scan backend: use one of {', '.join(BACKENDS)}"
    compile_setting = select(cfg, "task.compile")
    if compile_setting is not None and str(compile_setting).lower() not in ("auto", "true", "false"):
        yield f"task.compile={compile_setting} must be auto, true or false"


def schedule_options(cfg: DictConfig) -> Iterator[str]:
    """The schedule the task would build, built once here: an unknown kind or option fails now, not at step 1."""
    schedule = select(cfg, "task.schedule")
    if not isinstance(schedule, dict):
        return
    options = {k: v for k, v in schedule.items() if k not in ("warmup_epochs", "warmup_steps")}
    try:
        warmup_schedule(100, 10, **options)(50)
    except (TypeError, ValueError) as e:
        message = str(e).replace("warmup_schedule() got an unexpected keyword argument", "unknown option")
        yield f"task.schedule: {message}"


def group_choice(cfg: DictConfig, group: str) -> str | None:
    """The option picked for a config group (``trainer=gpu`` -> "gpu"), when Hydra recorded it."""
    from hydra.core.hydra_config import HydraConfig

    choices = select(cfg, "hydra.runtime.choices")
    if choices is None and HydraConfig.initialized():
        choices = OmegaConf.to_container(HydraConfig.get().runtime.choices)
    return (choices or {}).get(group)


def devices(cfg: DictConfig) -> Iterator[str]:
    accelerator = select(cfg, "trainer.accelerator")
    if accelerator not in ("gpu", "cuda"):
        return
    choice = group_choice(cfg, "trainer")
    asked = f"trainer.accelerator={accelerator}" + (f" (trainer={choice})" if choice else "")
    if not torch.cuda.is_available():
        yield (f"{asked} needs a CUDA GPU and this machine has none visible: use trainer=cpu, or trainer=ddp_cpu "
               "for data-parallel processes on the CPU")
        return
    wanted, visible = select(cfg, "trainer.devices"), torch.cuda.device_count()
    if is_int(wanted) and wanted > visible:
        yield f"trainer.devices={wanted} but {visible} GPU(s) are visible: use trainer.devices={visible} (or -1: all)"


def world_size(cfg: DictConfig) -> int | None:
    """Processes the trainer will start (devices x nodes), where the config says it without asking Lightning."""
    wanted, nodes = select(cfg, "trainer.devices"), select(cfg, "trainer.num_nodes") or 1
    accelerator = select(cfg, "trainer.accelerator")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if isinstance(wanted, list):
        count = len(wanted)
    elif wanted in (-1, "-1", "auto") and on_gpu:
        count = torch.cuda.device_count()
    elif wanted == "auto":
        count = 1
    elif is_int(wanted) and wanted > 0:
        count = wanted
    else:
        return None
    return count * nodes if is_int(nodes) and nodes > 0 else None


# ---- tasks, their data and their metrics --------------------------------------------------------------------------

TASK_KINDS = {
    "vision_mamba.tasks.classification.ClassificationTask": "classification",
    "vision_mamba.tasks.segmentation.SegmentationTask": "segmentation",
    "vision_mamba.tasks.detection.DetectionTask": "detection",
}
DATA_KINDS = {
    "vision_mamba.data.imagenet.ImageFolderDataModule": "classification",
    "vision_mamba.data.ade20k.ADE20KDataModule": "segmentation",
    "vision_mamba.data.coco.CocoDataModule": "detection",
}
DATA_FOR = {
    "classification": "data=imagenet data.root=DIR (or the default data=digits)",
    "segmentation": "data=ade20k data.root=DIR, or experiment=shapes_seg for the embedded demo",
    "detection": "data=coco data.root=DIR, or experiment=shapes_det for the embedded demo",
}


def kind_of(target: Any, kinds: dict[str, str]) -> str | None:
    """Which of our task/data families a ``_target_`` class belongs to (subclasses included); None for others."""
    if not isinstance(target, str):
        return None
    try:
        cls = hydra.utils.get_class(target)
    except Exception:  # a target that does not import: instantiation reports it with Hydra's own message
        return None
    return next((kinds[f"{c.__module__}.{c.__qualname__}"] for c in cls.__mro__
                 if f"{c.__module__}.{c.__qualname__}" in kinds), None)


def task_matches_data(cfg: DictConfig) -> Iterator[str]:
    task = kind_of(select(cfg, "task._target_"), TASK_KINDS)
    data = kind_of(select(cfg, "data._target_"), DATA_KINDS)
    if task and data and task != data:
        task_name = group_choice(cfg, "task") or task
        data_name = group_choice(cfg, "data") or select(cfg, "data._target_")
        yield f"task={task_name} needs {task} data but data={data_name} holds {data} data: use {DATA_FOR[task]}"


def logged_metrics(cfg: DictConfig) -> set[str] | None:
    """The names the configured task logs (see the tasks' docstrings); None for a task of another family."""
    kind = kind_of(select(cfg, "task._target_"), TASK_KINDS)
    train = ["loss"]
    if kind == "classification":
        ema = select(cfg, "task.ema_decay") if "ema_decay" in (cfg.get("task") or {}) else True  # the task's default
        evaluated, best = ["loss", "acc1", "acc5", *(["acc1_ema"] if ema else [])], "acc1"
    elif kind == "segmentation":
        evaluated, best = ["loss", "mIoU", "pixel_acc"], "mIoU"
    elif kind == "detection":
        from vision_mamba.tasks.detection import METRICS

        ious = ("bbox",) if select(cfg, "task.masks") is False else ("bbox", "segm")
        evaluated, best = [f"{iou}_{name}" for iou in ious for name in METRICS.values()], "bbox_mAP"
        losses = ["classifier", "box_reg", "objectness", "rpn_box_reg", *(["mask"] if "segm" in ious else [])]
        train += [f"loss_{name}" for name in losses]
    else:
        return None
    names = {f"{stage}/{name}" for stage in ("val", "test") for name in evaluated} | {f"val/{best}_best"}
    # logged on_step and on_epoch: Lightning adds the _step and _epoch variants
    return names | {f"train/{name}{suffix}" for name in train for suffix in ("", "_step", "_epoch")}


def metric_names(cfg: DictConfig) -> Iterator[str]:
    logged = logged_metrics(cfg)
    if logged is None:
        return
    task_name = group_choice(cfg, "task") or str(select(cfg, "task._target_")).rsplit(".", 1)[-1]
    monitor = select(cfg, "task.monitor")
    for key in ("optimized_metric", "task.monitor", "callbacks.model_checkpoint.monitor",
                "callbacks.early_stopping.monitor"):
        name = select(cfg, key)
        if name is None or name in logged or (key.startswith("callbacks.") and name == monitor):
            continue  # the callbacks follow task.monitor unless set apart: one report for one mistake
        yield f"{key}={name} is not a metric task={task_name} logs: use one of {', '.join(sorted(logged))}"
    mode = select(cfg, "task.monitor_mode")
    if mode is not None and mode not in ("min", "max"):
        yield f"task.monitor_mode={mode} must be min or max"


# ---- training-only rules ------------------------------------------------------------------------------------------


def mixup_batch(cfg: DictConfig) -> Iterator[str]:
    """timm's Mixup mixes each image with its mirror in the batch: every device's batch must be even."""
    mixup = select(cfg, "task.mixup")
    if not isinstance(mixup, dict) or kind_of(select(cfg, "task._target_"), TASK_KINDS) != "classification":
        return
    if not any(is_number(mixup.get(alpha)) and mixup[alpha] > 0 for alpha in ("mixup_alpha", "cutmix_alpha")):
        return  # the task turns Mixup off
    batch, world = select(cfg, "data.batch_size"), world_size(cfg)
    if not is_int(batch) or batch <= 0 or world is None or batch % world:  # the datamodule reports these
        return
    if (batch // world) % 2:
        even = -(-batch // (2 * world)) * 2 * world
        spread = f" over {world} processes" if world > 1 else ""
        yield (f"data.batch_size={batch}{spread} gives {batch // world} images per device, but Mixup/CutMix "
               f"(task.mixup) needs an even number: use data.batch_size={even}, or task.mixup=null")


def shortened(cfg: DictConfig) -> bool:
    """A debugging run that cuts epochs short does not follow the recipe's schedule: its warm-up is not checked."""
    limit = select(cfg, "trainer.limit_train_batches")
    cut = (is_int(limit) and limit > 0) or (is_number(limit) and limit < 1)
    return bool(select(cfg, "trainer.fast_dev_run") or select(cfg, "trainer.overfit_batches") or cut)


def warmup_length(cfg: DictConfig) -> Iterator[str]:
    if shortened(cfg):
        return
    max_steps, max_epochs = select(cfg, "trainer.max_steps"), select(cfg, "trainer.max_epochs")
    warmup_steps, warmup_epochs = select(cfg, "task.schedule.warmup_steps"), select(cfg, "task.schedule.warmup_epochs")
    never_peaks = "the learning rate would never reach its peak: shorten the warm-up or train longer"
    if is_int(warmup_steps) and is_int(max_steps) and 0 < max_steps <= warmup_steps:
        yield (f"task.schedule.warmup_steps={warmup_steps} covers the whole run (trainer.max_steps={max_steps}): "
               f"{never_peaks}")
    elif (warmup_steps is None and is_number(warmup_epochs) and is_int(max_epochs) and 0 < max_epochs <= warmup_epochs
          and max_steps in (None, -1)):
        yield (f"task.schedule.warmup_epochs={warmup_epochs} covers the whole run (trainer.max_epochs={max_epochs}): "
               f"{never_peaks}")


# ---- output folders -----------------------------------------------------------------------------------------------


def output_folders(cfg: DictConfig) -> Iterator[str]:
    """Every folder the run writes into must be writable now, not after its first epoch."""
    keys = ["paths.output_dir", "callbacks.model_checkpoint.dirpath"]
    keys += [f"logger.{name}.save_dir" for name in (cfg.get("logger") or {})]
    for key in keys:
        folder = select(cfg, key)
        reason = unwritable_reason(Path(folder)) if isinstance(folder, str) and folder else None
        if reason:
            yield f"{key}={folder} cannot be written ({reason}): point it (or paths.log_dir) at a writable folder"
