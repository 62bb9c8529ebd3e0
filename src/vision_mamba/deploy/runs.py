"""A trained run for inference: its task built from the run's config, the checkpoint's weights, the class names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torchvision.datasets.folder import find_classes

from vision_mamba.checkpointing import CheckpointError, load_checkpoint
from vision_mamba.tasks.base import VisionTask
from vision_mamba.tasks.classification import ClassificationTask
from vision_mamba.tasks.detection import DetectionTask
from vision_mamba.tasks.segmentation import SegmentationTask
from vision_mamba.utils.errors import UserError

KINDS = {ClassificationTask: "classification", SegmentationTask: "segmentation", DetectionTask: "detection"}
# state-dict keys that only one kind of task holds: how a checkpoint tells what it was trained for
MARKERS = {"segmentation": "net.decode_head.", "detection": "net.roi_heads.", "classification": "net.head."}


@dataclass
class LoadedRun:
    """The task in eval mode with the weights to use, what kind of task it is, and the checkpoint they came from
    (None when the weights came from ``model.pretrained``)."""

    task: VisionTask
    kind: str
    checkpoint: dict[str, Any] | None

    @property
    def net(self) -> nn.Module:
        """The network eval.py runs: logits for classification and segmentation, detections for detection."""
        return self.task.net


def task_kind(task: nn.Module) -> str:
    for cls, kind in KINDS.items():
        if isinstance(task, cls):
            return kind
    raise UserError(f"task {type(task).__name__} is not one of {', '.join(KINDS.values())}: nothing to run")


def checkpoint_kind(state_dict: dict[str, torch.Tensor]) -> str | None:
    """classification | segmentation | detection, from the keys only that kind of task has (None: none found)."""
    return next((kind for kind, prefix in MARKERS.items() if any(k.startswith(prefix) for k in state_dict)), None)


def load_weights(task: VisionTask, checkpoint: dict[str, Any], path: str, kind: str) -> None:
    """The checkpoint's ``state_dict`` into the task, with one line saying what does not fit when it does not."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict: give a .ckpt written by train.py")
    found = checkpoint_kind(state)
    if found is not None and found != kind:
        raise CheckpointError(
            f"{path} is a {found} checkpoint but the config builds a {kind} task: keep the checkpoint in its run "
            f"folder (its config is read from <run>/.hydra/config.yaml) or pass task={found} with its model and data"
        )
    own = task.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        example = (reshaped or missing or unexpected)[:3]
        raise CheckpointError(
            f"{path} does not fit the configured model ({len(missing)} keys missing, {len(unexpected)} unexpected, "
            f"{len(reshaped)} of another shape, e.g. {example}): build the model it was trained with (its run "
            "folder's config, or the same model=... and data.num_classes)"
        )
    task.load_state_dict(state)


def load_run(cfg: DictConfig) -> LoadedRun:
    """Build ``cfg.task`` around ``cfg.model`` (as eval.py does) and load ``cfg.ckpt_path`` into it; without a
    checkpoint the weights are those ``model.pretrained`` loaded."""
    net = hydra.utils.instantiate(cfg.model)
    task = hydra.utils.instantiate(cfg.task, net=net)
    kind = task_kind(task)
    checkpoint = None
    if cfg.get("ckpt_path"):
        checkpoint = load_checkpoint(cfg.ckpt_path)
        load_weights(task, checkpoint, str(cfg.ckpt_path), kind)
    return LoadedRun(task.eval(), kind, checkpoint)


def class_names(run: LoadedRun, datamodule: Any) -> list[str] | None:
    """A classification run's class names: saved in its checkpoint by the datamodule, else the class folders of
    the data it names (the sorted folder names, as ImageFolder numbers them), else None."""
    saved = (run.checkpoint or {}).get(type(datamodule).__qualname__) or {}
    if saved.get("class_names"):
        return list(saved["class_names"])
    split = Path(datamodule.root) / datamodule.hparams.val_split
    return find_classes(str(split))[0] if split.is_dir() else None
