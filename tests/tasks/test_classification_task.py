"""ClassificationTask's numbers: top-1, top-5 and the loss over a split of uneven batches, by hand."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from lightning import Trainer
from lightning.pytorch import callbacks as pl_callbacks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vision_mamba.tasks import ClassificationTask

# Seven classes; each sample's logits are 6, 5, ..., 0 in some order, with its true class at rank r (1 = highest).
RANKS = [1, 3, 6, 1, 5, 7]
BATCHES = [2, 1, 3]  # uneven: a mean of per-batch means would differ from the per-sample mean
# top-1: ranks 1, 1 -> 2 / 6; top-5: ranks 1, 3, 1, 5 -> 4 / 6.
# cross-entropy of a sample: logsumexp(0..6) - (7 - r), logsumexp(0..6) = log((e^7 - 1) / (e - 1));
# over the split: logsumexp - (6 + 4 + 1 + 6 + 2 + 0) / 6.
LOGSUMEXP = math.log((math.e**7 - 1) / (math.e - 1))
ACC1, ACC5, LOSS = 2 / 6, 4 / 6, LOGSUMEXP - 19 / 6


def logits_and_targets() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows, targets = [], []
    for rank in RANKS:
        order = torch.randperm(7, generator=g)  # order[k]: the class holding the k-th highest logit
        logits = torch.empty(7)
        logits[order] = torch.arange(6, -1, -1, dtype=torch.float32)
        rows.append(logits)
        targets.append(order[rank - 1].item())
    return torch.stack(rows), torch.tensor(targets)


class UnevenBatches(torch.utils.data.Sampler):
    def __iter__(self):
        start = 0
        for size in BATCHES:
            yield list(range(start, start + size))
            start += size

    def __len__(self) -> int:
        return len(BATCHES)


def run(stage: str, tmp_path) -> dict:
    logits, targets = logits_and_targets()
    loader = DataLoader(TensorDataset(logits, targets), batch_sampler=UnevenBatches())
    task = ClassificationTask(net=nn.Identity(), num_classes=7, ema_decay=None)  # the 'images' are the logits
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    run = trainer.validate if stage == "val" else trainer.test
    return run(task, dataloaders=loader, verbose=False)[0]


@pytest.mark.parametrize("stage", ["val", "test"])
def test_top1_top5_and_loss_by_hand(stage, tmp_path) -> None:
    metrics = run(stage, tmp_path)
    assert metrics[f"{stage}/acc1"] == pytest.approx(ACC1, abs=1e-6)
    assert metrics[f"{stage}/acc5"] == pytest.approx(ACC5, abs=1e-6)
    assert metrics[f"{stage}/loss"] == pytest.approx(LOSS, abs=1e-5)


def test_ema_accuracy_is_the_averaged_networks(tmp_path) -> None:
    # the network's weights are permuted after the EMA copied them: val/acc1_ema is the accuracy of the identity
    # (the by-hand ACC1), val/acc1 that of the permuted logits
    net = nn.Linear(7, 7, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(7))
    task = ClassificationTask(net=net, num_classes=7, ema_decay=0.5)
    with torch.no_grad():
        net.weight.copy_(torch.eye(7).roll(1, dims=0))
    logits, targets = logits_and_targets()
    loader = DataLoader(TensorDataset(logits, targets), batch_sampler=UnevenBatches())
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        metrics = run(task, dataloaders=loader, verbose=False)[0]
        assert metrics[f"{stage}/acc1_ema"] == pytest.approx(ACC1, abs=1e-6)
        top1_permuted = (logits.roll(-1, dims=1).argmax(1) == targets).float().mean().item()
        assert metrics[f"{stage}/acc1"] == pytest.approx(top1_permuted, abs=1e-6)


class RecordWeights(pl_callbacks.Callback):
    """The network's weight after each optimiser step (on_train_batch_end follows the step)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.net.weight.detach().clone())


def test_ema_follows_each_optimiser_step(tmp_path) -> None:
    # timm's ModelEmaV3 given the step: the first update copies the weights (no average of the random
    # initialisation), later ones average with the decay: ema_k = d * ema_(k-1) + (1 - d) * w_k
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(6, 7), torch.randint(0, 7, (6,)))
    task = ClassificationTask(net=nn.Linear(7, 7, bias=False), num_classes=7, ema_decay=0.5, base_lr=0.5,
                              base_batch_size=None, optimizer=partial(torch.optim.SGD))
    recorder = RecordWeights()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, max_epochs=1, limit_val_batches=0, callbacks=[recorder],
                      default_root_dir=str(tmp_path))
    trainer.fit(task, DataLoader(data, batch_size=2))
    w1, w2, w3 = recorder.weights
    assert not torch.equal(w1, w2) and not torch.equal(w2, w3)  # the weights moved at every step
    expected = 0.5 * (0.5 * w1 + 0.5 * w2) + 0.5 * w3
    torch.testing.assert_close(task.ema.module.weight, expected, rtol=0, atol=1e-7)


def test_mixup_trains_on_mixed_images_and_soft_targets() -> None:
    # mixup only (no CutMix): the criterion sees lam * x + (1 - lam) * x.flip(0) and the same mix of the smoothed
    # one-hot targets, for one lam; the loss is the soft-target cross-entropy of those
    logits, targets = logits_and_targets()
    logits, targets = logits[:4], targets[:4]
    task = ClassificationTask(net=nn.Identity(), num_classes=7, ema_decay=None, label_smoothing=0.1,
                              mixup={"mixup_alpha": 0.8, "cutmix_alpha": 0.0})
    seen = []

    class Recorded(nn.Module):
        def forward(self, out, soft):
            seen.append((out, soft))
            return criterion(out, soft)

    criterion, task.train_criterion = task.train_criterion, Recorded()
    task.log = lambda *args, **kwargs: None
    loss = task.training_step((logits.clone(), targets), 0)
    (mixed, soft), = seen
    smooth = torch.full((4, 7), 0.1 / 7)
    smooth[torch.arange(4), targets] += 0.9
    lam = (mixed - logits.flip(0)).flatten() @ (logits - logits.flip(0)).flatten()
    lam = lam / (logits - logits.flip(0)).flatten().square().sum()
    assert 0 <= lam <= 1
    torch.testing.assert_close(mixed, lam * logits + (1 - lam) * logits.flip(0))
    torch.testing.assert_close(soft, lam * smooth + (1 - lam) * smooth.flip(0))
    by_hand = -(soft * torch.log_softmax(mixed, dim=1)).sum(1).mean()
    torch.testing.assert_close(loss, by_hand)
