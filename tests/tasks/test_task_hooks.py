"""VisionTask's hooks in process: the compile setting and its first-step timing, and the one-line refusal of a
checkpoint whose weights do not fit (the end-to-end runs of tests/scale go through train.py in a subprocess)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vision_mamba.tasks import ClassificationTask, base
from vision_mamba.utils.errors import UserError


def attach(task, device: str = "cpu", ckpt_path: str | None = None) -> None:
    """A stand-in for the Trainer with what these hooks read: the root device and the checkpoint being loaded."""
    task._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), ckpt_path=ckpt_path)


def task_with(net: nn.Module | None = None, **kwargs) -> ClassificationTask:
    return ClassificationTask(net=net or nn.Linear(2, 3), num_classes=3, ema_decay=None, **kwargs)


# --- compile ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("auto", "cuda", True), ("auto", "cpu", False),
    ("true", "cpu", True), (True, "cpu", True), ("True", "cpu", True),  # YAML `true` arrives as a bool
    ("false", "cuda", False), (False, "cuda", False),
])
def test_compile_setting(setting, device, expected) -> None:
    task = task_with(compile=setting)
    attach(task, device)
    assert task.compile_enabled() is expected


def test_an_unknown_compile_setting_names_the_choices() -> None:
    task = task_with(compile="yes")
    attach(task)
    with pytest.raises(ValueError, match=r"^task.compile must be auto, true or false; got 'yes'$"):
        task.compile_enabled()


class NoCudaGraphs(ClassificationTask):
    cuda_graphs = False  # as DetectionTask: its inputs change shape


@pytest.mark.parametrize(("cls", "device", "compile_mode", "expected_mode", "logged"), [
    (ClassificationTask, "cuda", None, "reduce-overhead", "torch.compile (reduce-overhead mode)"),
    (ClassificationTask, "cpu", None, None, "torch.compile (default mode)"),
    (NoCudaGraphs, "cuda", None, None, "torch.compile (default mode)"),
    (ClassificationTask, "cuda", "max-autotune", "max-autotune", "torch.compile (max-autotune mode)"),
])
def test_configure_model_compiles_the_network_once_in_the_chosen_mode(
    cls, device, compile_mode, expected_mode, logged, monkeypatch, caplog
) -> None:
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda module, mode=None: compiled.append((module, mode)))
    task = cls(net=nn.Linear(2, 3), num_classes=3, ema_decay=None, compile="true", compile_mode=compile_mode)
    attach(task, device)
    with caplog.at_level(logging.INFO, logger="vision_mamba.tasks.base"):
        task.configure_model()
        task.configure_model()  # Lightning calls it again for each fit/validate/test: compiled once
    assert compiled == [(task.net, expected_mode)]
    assert [r.getMessage() for r in caplog.records] == [f"[rank: 0] {logged}: the first step includes the compilation"]


def test_configure_model_leaves_the_network_uncompiled_when_off(monkeypatch) -> None:
    monkeypatch.setattr(nn.Module, "compile", lambda *a, **k: pytest.fail("compiled"))
    task = task_with(compile="false")
    attach(task, "cuda")
    task.configure_model()
    task.on_train_batch_start(None, 0)
    task.on_train_batch_end(None, None, 0)  # nothing timed, nothing logged (self.log has no trainer here)


def test_the_first_compiled_step_is_timed_and_logged_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(nn.Module, "compile", lambda module, mode=None: None)
    clock = iter([10.0, 12.5])  # the step's start and end; a third reading would raise StopIteration
    monkeypatch.setattr(base.time, "perf_counter", lambda: next(clock))
    task = task_with(compile="true")
    logged = []
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: logged.append((args, kwargs)))
    attach(task)
    task.configure_model()
    with caplog.at_level(logging.INFO, logger="vision_mamba.tasks.base"):
        for step in range(3):
            task.on_train_batch_start(None, step)
            task.on_train_batch_end(None, None, step)
    # rank zero only: the other ranks' clocks would each log their own time
    assert logged == [(("compile/first_step_s", 2.5), {"rank_zero_only": True})]
    assert [r.getMessage() for r in caplog.records] == ["[rank: 0] first training step (torch.compile included): 2.5 s"]


# --- the checkpoint's network against this run's -------------------------------------------------------------------


class Tiny(nn.Module):
    """Named like a Vim: pos_embed (its last size is the width), layers.N (the depth), head (the classes)."""

    def __init__(self, width: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, width))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(width, classes)


OURS = "Tiny (embed 4, depth 3, 5 classes)"
ADVICE = ("Give the model and data settings it was trained with (resuming inside its run folder does: "
          "hydra.run.dir=<run> ckpt_path=last), or load only its network weights with model.pretrained=<checkpoint>")


def refusal(checkpoint: dict, ckpt_path: str | None = None, trainer: bool = True) -> str:
    task = task_with(Tiny())
    if trainer:
        attach(task, ckpt_path=ckpt_path)
    with pytest.raises(UserError) as caught:
        task.on_load_checkpoint(checkpoint)
    return str(caught.value)


def state_of(net: nn.Module) -> dict[str, torch.Tensor]:
    """A task's weights: the network's under net., and the best-so-far metric (10 tensors for Tiny)."""
    return task_with(net).state_dict()


def test_matching_weights_load_and_the_architecture_is_saved() -> None:
    task = task_with(Tiny())
    attach(task)
    checkpoint = {"state_dict": state_of(Tiny())}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint["net_architecture"] == "Tiny"
    task.on_load_checkpoint(checkpoint)  # no error


def test_weights_of_another_width_are_refused_naming_both_networks_and_three_differences() -> None:
    # every tensor but head.bias (5 classes either way) depends on the width
    checkpoint = {"state_dict": state_of(Tiny(width=6)), "net_architecture": "vim_small_patch16_224"}
    assert refusal(checkpoint, ckpt_path="runs/a/checkpoints/last.ckpt") == (
        "runs/a/checkpoints/last.ckpt: checkpoint of a vim_small_patch16_224 (embed 6, depth 3, 5 classes), "
        f"this run builds a {OURS}: 8 of 10 tensors differ in shape, e.g. net.pos_embed (1, 3, 6) vs (1, 3, 4), "
        f"net.layers.0.weight (6, 6) vs (4, 4), net.layers.0.bias (6,) vs (4,). {ADVICE}"
    )


def test_missing_and_unexpected_tensors_are_counted_with_three_examples_each() -> None:
    theirs = state_of(Tiny())
    for i in range(2):  # a checkpoint whose first two blocks are named differently: its depth reads as 1
        theirs[f"net.blocks.{i}.weight"] = theirs.pop(f"net.layers.{i}.weight")
        theirs[f"net.blocks.{i}.bias"] = theirs.pop(f"net.layers.{i}.bias")
    # no trainer (LightningModule.load_from_checkpoint) and no architecture saved (an older checkpoint)
    assert refusal({"state_dict": theirs}, trainer=False) == (
        f"the checkpoint: checkpoint of a network (embed 4, depth 1, 5 classes), this run builds a {OURS}: "
        "4 tensors of this model are missing, e.g. net.layers.0.weight, net.layers.0.bias, net.layers.1.weight; "
        "4 tensors the model does not have, e.g. net.blocks.0.weight, net.blocks.0.bias, net.blocks.1.weight. "
        f"{ADVICE}"
    )


def test_shape_missing_and_unexpected_problems_are_all_named() -> None:
    theirs = state_of(Tiny(classes=7))
    del theirs["net.layers.1.bias"]
    theirs["net.extra"] = torch.zeros(1)
    assert refusal({"state_dict": theirs}, ckpt_path="x.ckpt") == (
        "x.ckpt: checkpoint of a network (embed 4, depth 3, 7 classes), "
        f"this run builds a {OURS}: 2 of 10 tensors differ in shape, e.g. net.head.weight (7, 4) vs (5, 4), "
        "net.head.bias (7,) vs (5,); 1 tensors of this model are missing, e.g. net.layers.1.bias; "
        f"1 tensors the model does not have, e.g. net.extra. {ADVICE}"
    )


def test_a_checkpoint_without_weights_is_refused() -> None:
    assert refusal({"epoch": 3}, ckpt_path="x.ckpt") == (
        f"x.ckpt: checkpoint of a network, this run builds a {OURS}: 10 tensors of this model are missing, "
        f"e.g. net.pos_embed, net.layers.0.weight, net.layers.0.bias. {ADVICE}"
    )


def test_non_strict_loading_skips_the_check() -> None:
    task = task_with(Tiny())
    task.strict_loading = False
    task.on_load_checkpoint({"state_dict": {}})


def test_the_architecture_is_timms_name_of_the_network_or_of_its_backbone() -> None:
    net = Tiny()
    net.pretrained_cfg = {"architecture": "vim_tiny_patch16_224"}
    assert base._architecture(net) == "vim_tiny_patch16_224"
    segmentor = nn.Module()  # a task network wrapping a timm backbone (UperNet, Faster R-CNN)
    segmentor.backbone = net
    assert base._architecture(segmentor) == "vim_tiny_patch16_224"
    segmentor.pretrained_cfg = {}  # a config that names no architecture: the backbone's name
    assert base._architecture(segmentor) == "vim_tiny_patch16_224"
    assert base._architecture(Tiny()) == "Tiny"
