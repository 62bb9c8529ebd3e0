"""The optimiser as Lightning runs it: per-parameter learning rates and weight decay, and the schedule's factors."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Callback, LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vision_mamba.models.vim import VisionMamba
from vision_mamba.tasks import ClassificationTask
from vision_mamba.tasks.optim import build_param_groups, no_weight_decay_names, warmup_schedule
from vision_mamba.utils.errors import UserError

DEPTH = 3


def tiny_vim() -> VisionMamba:
    return VisionMamba(img_size=16, patch_size=8, embed_dim=16, depth=DEPTH, d_state=4, num_classes=3,
                       scan_backend="torch")


class Images(LightningDataModule):
    """`batches` batches of `batch_size` random 16x16 images; `batch_size` is what the task's LR scaling reads."""

    def __init__(self, batch_size: int, batches: int) -> None:
        super().__init__()
        self.batch_size, self.batches = batch_size, batches

    def train_dataloader(self) -> DataLoader:
        n = self.batch_size * self.batches
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g))
        return DataLoader(data, batch_size=self.batch_size)


class RecordLR(Callback):
    """The learning rate and weight decay of every parameter, as the optimiser holds them at each optimiser step."""

    def __init__(self) -> None:
        self.steps: list[dict[int, tuple[float, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]})


def fit(task: ClassificationTask, batch_size: int, batches: int, accumulate: int, **trainer_args) -> RecordLR:
    recorder = RecordLR()
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, accumulate_grad_batches=accumulate,
                      callbacks=[recorder], **trainer_args)
    trainer.fit(task, datamodule=Images(batch_size, batches))
    return recorder


def layer_id(name: str) -> int:
    """timm's layer numbering (as for its ViT) written out for VisionMamba: stem 0, block i -> i + 1, the final norm
    with the last block, the head above it. (BEiT/mmseg put the final norm with the head; the segmentor prunes it.)"""
    if name.startswith(("cls_token", "pos_embed", "patch_embed.")):
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm_f."):
        return DEPTH
    assert name.startswith("head."), name
    return DEPTH + 1


# Factors of a 12-step run with a 4-step linear warm-up from 1e-3, then cosine to 0, by hand:
# warm-up 1e-3 + 0.999 * s / 4; cosine 0.5 * (1 + cos(pi * (s - 4) / 8)).
COSINE_12_WARMUP_4 = {
    0: 1e-3,
    1: 0.25075,
    2: 0.5005,
    3: 0.75025,
    4: 1.0,  # end of warm-up: the peak
    6: 0.5 * (1 + math.sqrt(0.5)),  # cos(pi / 4)
    8: 0.5,  # cosine midpoint
    10: 0.5 * (1 - math.sqrt(0.5)),
    11: 0.5 * (1 + math.cos(math.pi * 7 / 8)),
}


def test_param_group_lrs_are_scaled_base_lr_times_layer_decay_through_the_schedule() -> None:
    torch.manual_seed(0)
    net = tiny_vim()
    task = ClassificationTask(net=net, num_classes=3, ema_decay=None, base_lr=1e-3, base_batch_size=16,
                              weight_decay=0.05, layer_decay=0.75,
                              schedule={"kind": "cosine", "warmup_steps": 4})
    # global batch 4 x 3 accumulated = 12 -> lr = 1e-3 * 12 / 16; 36 batches / 3 = 12 optimiser steps (3, not 2:
    # Lightning counts a scheduler's frequency in batches, and every second batch would hide a frequency of 2)
    steps = fit(task, batch_size=4, batches=36, accumulate=3, max_epochs=1).steps
    assert len(steps) == 12
    peak = 1e-3 * 12 / 16
    no_decay = net.no_weight_decay()
    params = dict(net.named_parameters())
    assert len({layer_id(n) for n in params}) == DEPTH + 2
    for step, factor in COSINE_12_WARMUP_4.items():
        held = steps[step]
        assert len(held) == len(params)
        for name, p in params.items():
            lr, wd = held[id(p)]
            expected = peak * 0.75 ** (DEPTH + 1 - layer_id(name)) * factor
            assert lr == pytest.approx(expected, rel=1e-9, abs=0), (step, name)
            assert wd == (0.0 if p.ndim <= 1 or name in no_decay else 0.05), name


def test_without_layer_decay_every_parameter_has_the_scaled_lr_and_the_declared_decay() -> None:
    torch.manual_seed(0)
    net = tiny_vim()
    task = ClassificationTask(net=net, num_classes=3, ema_decay=None, base_lr=4e-3, base_batch_size=512,
                              weight_decay=0.1, layer_decay=None, schedule={"kind": "constant"})
    steps = fit(task, batch_size=2, batches=2, accumulate=1, max_epochs=1).steps
    declared = net.no_weight_decay()
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.2.mixer.D_b"} <= declared
    for held in steps:
        for name, p in net.named_parameters():
            lr, wd = held[id(p)]
            assert lr == pytest.approx(4e-3 * 2 / 512, rel=1e-12), name
            # decayed: the 2-D+ weights the model does not declare (in_proj, x_proj, dt_proj, conv1d, head...)
            assert wd == (0.0 if p.ndim <= 1 or name in declared else 0.1), name
    decayed = {n for n, p in net.named_parameters() if steps[0][id(p)][1] > 0}
    assert "layers.1.mixer.in_proj.weight" in decayed and "head.weight" in decayed
    assert "layers.1.mixer.A_log" not in decayed and "pos_embed" not in decayed


@pytest.mark.parametrize("run", [dict(max_epochs=3), dict(max_steps=12)], ids=["max_epochs", "max_steps"])
def test_warmup_epochs_count_optimiser_steps_of_one_epoch(run) -> None:
    # 8 batches, 2 accumulated: 4 optimiser steps per epoch; warm-up 1 epoch = 4 steps, whether the run is
    # bounded by epochs or by steps
    task = ClassificationTask(net=tiny_vim(), num_classes=3, ema_decay=None, base_lr=1e-3, base_batch_size=None,
                              schedule={"kind": "cosine", "warmup_epochs": 1})
    steps = fit(task, batch_size=2, batches=8, accumulate=2, **run).steps
    assert len(steps) == 12
    head = id(task.net.head.weight)
    got = [s[head][0] / 1e-3 for s in steps]
    for step, factor in COSINE_12_WARMUP_4.items():
        assert got[step] == pytest.approx(factor, rel=1e-9), step


def test_warmup_epochs_of_a_loader_without_length_is_a_user_error() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.randn(3, 16, 16), 0

    class StreamData(Images):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(Stream(), batch_size=self.batch_size)

    task = ClassificationTask(net=tiny_vim(), num_classes=3, ema_decay=None, schedule={"warmup_epochs": 1})
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_steps=2)
    message = ("^task\\.schedule\\.warmup_epochs needs a training loader of known length: "
               "set task\\.schedule\\.warmup_steps instead$")
    with pytest.raises(UserError, match=message):
        trainer.fit(task, datamodule=StreamData(2, 0))


def test_warmup_epochs_of_an_epoch_of_one_batch_is_one_step() -> None:
    # 3 epochs of one batch: warm-up 1 step, then cosine over the other 2 (by hand: 1e-3, 1, cos at half-way 0.5)
    task = ClassificationTask(net=tiny_vim(), num_classes=3, ema_decay=None, base_lr=1e-3, base_batch_size=None,
                              schedule={"kind": "cosine", "warmup_epochs": 1})
    steps = fit(task, batch_size=2, batches=1, accumulate=1, max_epochs=3).steps
    head = id(task.net.head.weight)
    assert [s[head][0] / 1e-3 for s in steps] == pytest.approx([1e-3, 1.0, 0.5], rel=1e-9)


# ---- the schedule factors at known steps ---------------------------------------------------------------------------


def test_cosine_with_a_floor() -> None:
    f = warmup_schedule(total_steps=110, warmup_steps=10, kind="cosine", min_factor=0.1)
    assert f(0) == pytest.approx(1e-3) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # midpoint of 10..110
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # past the end it stays at the floor


def test_warmup_from_another_start_factor() -> None:
    f = warmup_schedule(total_steps=100, warmup_steps=20, kind="constant", warmup_factor=0.2)
    assert [f(s) for s in (0, 5, 10, 19, 20, 99)] == pytest.approx([0.2, 0.4, 0.6, 0.96, 1.0, 1.0])


def test_poly() -> None:
    # mmseg's ADE20K schedule: linear decay (power 1) to 0 after the warm-up
    f = warmup_schedule(total_steps=1100, warmup_steps=100, kind="poly")
    assert [f(s) for s in (100, 350, 600, 1100)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    g = warmup_schedule(total_steps=100, warmup_steps=0, kind="poly", power=2.0, min_factor=0.2)
    assert [g(s) for s in (0, 50, 75, 100)] == pytest.approx([1.0, 0.2 + 0.8 * 0.25, 0.2 + 0.8 / 16, 0.2])


def test_step_milestones_are_fractions_of_the_whole_run() -> None:
    # the detection recipe: x0.1 at 89% and again at 96% of the steps
    f = warmup_schedule(total_steps=100, warmup_steps=5, kind="step", milestones=(0.89, 0.96), gamma=0.1)
    assert f(0) == pytest.approx(1e-3) and f(5) == 1.0
    assert [f(s) for s in (50, 88, 89, 95, 96, 99)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_constant_and_unknown_kind() -> None:
    f = warmup_schedule(total_steps=10, warmup_steps=0, kind="constant")
    assert [f(s) for s in range(12)] == [1.0] * 12
    # refused when the schedule is built, not when the warm-up ends hours into the run
    with pytest.raises(ValueError, match="^unknown schedule kind 'linear': use cosine, poly, step or constant$"):
        warmup_schedule(total_steps=1000, warmup_steps=100, kind="linear")


def test_warmup_is_cut_to_leave_one_decay_step() -> None:
    f = warmup_schedule(total_steps=4, warmup_steps=10, kind="cosine")
    assert [f(s) for s in range(4)] == pytest.approx([1e-3, 1e-3 + 0.999 / 3, 1e-3 + 0.999 * 2 / 3, 1.0])
    assert warmup_schedule(total_steps=1, warmup_steps=5)(0) == 1.0


def test_warmup_never_reaches_the_last_step_and_past_the_end_stays_at_the_end() -> None:
    f = warmup_schedule(total_steps=2, warmup_steps=5, kind="cosine")  # warm-up cut to 1 step
    assert [f(0), f(1), f(2), f(3)] == pytest.approx([1e-3, 1.0, 0.0, 0.0])
    assert warmup_schedule(total_steps=0, warmup_steps=0)(0) == 1.0  # an empty run still gives a factor


def test_step_decay_defaults_to_a_tenth() -> None:
    f = warmup_schedule(total_steps=10, warmup_steps=0, kind="step", milestones=(0.5,))
    assert [f(4), f(5)] == pytest.approx([1.0, 0.1])


def test_step_schedule_with_milestones_from_the_config(tmp_path) -> None:
    # the detection recipe's form: milestones a list (as Hydra gives it), through configure_optimizers
    from omegaconf import OmegaConf

    schedule = OmegaConf.create({"kind": "step", "milestones": [0.5, 0.75], "gamma": 0.5, "warmup_steps": 0})
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    task = ClassificationTask(net=net, num_classes=3, ema_decay=None, base_lr=1.0, base_batch_size=None,
                              schedule=schedule)
    steps = fit(task, batch_size=2, batches=8, accumulate=1, max_epochs=1).steps
    weight = id(net[1].weight)
    assert [s[weight][0] for s in steps] == pytest.approx([1.0] * 4 + [0.5] * 2 + [0.25] * 2)


class Blocks(nn.Module):
    """A model declaring no-decay names three ways: full names, leaf names, and a `_no_weight_decay` flag."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(4, 4))  # declared by full name
        self.inner = nn.Module()
        self.inner.deep = nn.Module()
        self.inner.deep.scale = nn.Parameter(torch.zeros(4, 4))  # declared by its leaf name "scale"
        self.flagged = nn.Parameter(torch.zeros(4, 4))
        self.flagged._no_weight_decay = True
        self.bias = nn.Parameter(torch.zeros(4))  # 1-D: never decayed
        self.gain = nn.Parameter(torch.zeros(()))  # 0-D: never decayed
        self.weight = nn.Parameter(torch.zeros(4, 4))  # decayed

    def no_weight_decay(self) -> set[str]:
        return {"embed", "scale"}


class Wrapper(nn.Module):
    """A detector or segmentor: the backbone's declarations apply under its attribute name."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Blocks()
        self.head = nn.Linear(4, 4)


def test_no_weight_decay_names_follows_every_declaration() -> None:
    assert no_weight_decay_names(Blocks()) == {"embed", "inner.deep.scale", "flagged", "bias", "gain"}
    assert no_weight_decay_names(Wrapper()) == {f"backbone.{n}" for n in ("embed", "inner.deep.scale", "flagged",
                                                                           "bias", "gain")} | {"head.bias"}


def test_layer_decay_of_one_or_more_is_no_layer_decay_and_a_model_without_groups_is_refused() -> None:
    model = Wrapper()
    for decay in (None, 1.0, 1.5):
        groups = build_param_groups(model, weight_decay=0.1, layer_decay=decay)
        assert all("lr_scale" not in g for g in groups), decay
        assert {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]} == {
            id(model.backbone.weight), id(model.head.weight)}
    with pytest.raises(ValueError) as error:
        build_param_groups(model, weight_decay=0.1, layer_decay=0.9)
    assert str(error.value) == "layer_decay=0.9 needs a model with group_matcher(); Wrapper has none"


def test_the_optimiser_summary_line(tmp_path, caplog) -> None:
    task = ClassificationTask(net=tiny_vim(), num_classes=3, ema_decay=None, base_lr=1e-3, base_batch_size=16,
                              schedule={"kind": "cosine", "warmup_steps": 1})
    with caplog.at_level("INFO"):
        fit(task, batch_size=4, batches=4, accumulate=2, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "vision_mamba.tasks.base"]
    assert lines == ["[rank: 0] optimiser: lr 0.0005 (base 0.001 x batch 8 / 16), 2 steps, 1 warm-up"]
