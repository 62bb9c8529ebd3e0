"""ClassificationTask's numbers: top-1, top-5 and the loss over a split of uneven batches, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Trainer
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
