"""SegmentationTask's numbers: the loss against torch's cross-entropy, padding labels, and metrics by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vision_mamba.data.ade20k import ADE20KDataModule
from vision_mamba.tasks.segmentation import SegmentationTask


class TwoHeads(nn.Module):
    """A 'segmentor' whose main and auxiliary logits are fixed tensors (scaled by a parameter, for gradients); it
    records the images it is given."""

    def __init__(self, logits: torch.Tensor, aux: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.aux = logits, aux
        self.scale = nn.Parameter(torch.ones(()))
        self.aux_calls = 0
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        self.inputs.append(x)
        if with_aux:
            self.aux_calls += 1
            return self.logits * self.scale, self.aux * self.scale
        return self.logits * self.scale


def task_for(net: nn.Module, num_classes: int, **kwargs) -> SegmentationTask:
    return SegmentationTask(net=net, segmentor=lambda backbone: backbone, num_classes=num_classes, **kwargs)


@pytest.mark.parametrize("aux_weight", [0.25, 0.0])
def test_training_loss_is_torch_cross_entropy_ignoring_255_plus_the_weighted_aux(aux_weight) -> None:
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    target[torch.rand(2, 6, 7) < 0.3] = 255
    target[1, :3] = 255  # images with different numbers of labelled pixels: a per-image mean would differ
    net = TwoHeads(logits, aux)
    images = torch.zeros(2, 3, 6, 7)
    loss = task_for(net, 5, aux_weight=aux_weight).training_step((images, target), 0)
    assert len(net.inputs) == 1 and net.inputs[0] is images
    want = F.cross_entropy(logits, target, ignore_index=255)
    if aux_weight:
        want = want + aux_weight * F.cross_entropy(aux, target, ignore_index=255)
    assert net.aux_calls == (1 if aux_weight else 0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_calling_the_task_is_the_segmentor_on_the_images() -> None:
    logits = torch.randn(1, 3, 4, 4)
    net = TwoHeads(logits, logits)
    images = torch.rand(1, 3, 4, 4)
    assert torch.equal(task_for(net, 3)(images), logits) and net.inputs == [images]


def test_a_batch_with_no_labelled_pixel_gives_zero_loss_and_zero_gradients() -> None:
    net = TwoHeads(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))
    loss = task_for(net, 3).training_step((torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 255)), 0)
    loss.backward()
    assert loss.item() == 0.0 and net.scale.grad.item() == 0.0


def test_training_crops_pad_the_mask_with_255_and_the_image_with_zeros(tmp_path) -> None:
    # one 20x30 ADE20K image, resized to fit (24, 20), then padded to the 32x32 crop at the bottom/right
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        labels = np.repeat(np.arange(30)[None] // 10 + 1, 20, axis=0).astype(np.uint8)  # file labels 1, 2, 3 in bands
        labels[:, :2] = 0  # "other": ignored like the padding
        Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(base / "images" / split / f"ADE_{split}_0001.jpg")
        Image.fromarray(labels).save(base / "annotations" / split / f"ADE_{split}_0001.png")
    dm = ADE20KDataModule(root=str(tmp_path), num_classes=3, img_size=32, scale=(24, 20), ratio_range=None,
                          hflip=0.0, photometric=False, num_workers=0, persistent_workers=False, batch_size=1)
    dm.setup("fit")
    image, mask = dm.data_train[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    h, w = 16, 24  # keep-ratio resize to fit (24, 20): factor min(24 / 30, 20 / 20) = 0.8
    assert (mask[h:] == 255).all() and (mask[:, w:] == 255).all(), "padding must be ignored"
    assert (image[:, h:] == 0).all() and (image[:, :, w:] == 0).all(), "padding is 0 in normalised space"
    inside = mask[:h, :w]
    assert set(inside.unique().tolist()) == {0, 1, 2, 255}
    assert (inside[:, 0] == 255).all() and (inside[:, -1] == 2).all()
    assert (image[:, :h, :w] != 0).all()


# ---- metrics by hand over three images -----------------------------------------------------------------------------

TARGETS = [[[0, 0, 1], [1, 255, 2]], [[2, 2, 3], [3, 3, 255]], [[0, 1, 2], [3, 255, 255]]]
PREDS = [[[0, 1, 1], [1, 0, 2]], [[2, 3, 3], [3, 2, 1]], [[0, 1, 2], [0, 3, 3]]]
# Over the 14 labelled pixels of the three images (ignored pixels count for no class, whatever is predicted there):
#   class 0: truth 3, predicted 3, both 2 -> IoU 2 / 4;   class 1: truth 3, predicted 4, both 3 -> 3 / 4
#   class 2: truth 4, predicted 4, both 3 -> 3 / 5;       class 3: truth 4, predicted 3, both 2 -> 2 / 5
# mIoU = (0.5 + 0.75 + 0.6 + 0.4) / 4; pixel accuracy = 10 correct / 14.
MIOU, PIXEL_ACC, CORRECT, LABELLED = (0.5 + 0.75 + 0.6 + 0.4) / 4, 10 / 14, 10, 14


def test_miou_pixel_accuracy_and_loss_accumulate_over_the_whole_split(tmp_path: Path) -> None:
    preds, targets = torch.tensor(PREDS), torch.tensor(TARGETS)
    logits = F.one_hot(preds, 4).permute(0, 3, 1, 2).float()
    loader = DataLoader(TensorDataset(logits, targets), batch_size=1)  # one image per batch
    task = task_for(nn.Identity(), 4,  # the 'images' are the logits
                    inference={"mode": "whole"}, overlay_images=0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    metrics = trainer.validate(task, dataloaders=loader, verbose=False)[0]
    assert metrics["val/mIoU"] == pytest.approx(MIOU, abs=1e-6)
    assert metrics["val/pixel_acc"] == pytest.approx(PIXEL_ACC, abs=1e-6)
    # one-hot logits: a pixel costs log(e + 3) - 1 when right and log(e + 3) when wrong; the loss is the mean over
    # every labelled pixel of the split, not a mean of per-image means
    assert metrics["val/loss"] == pytest.approx(math.log(math.e + 3) - CORRECT / LABELLED, abs=1e-6)


class WindowMean(nn.Module):
    """Logits that depend on the window: each pixel's first three channels plus their mean over the window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] + x[:, :3].mean((2, 3), keepdim=True)


def slide_by_hand(x: torch.Tensor, rows: list[int], cols: list[int], crop: int) -> torch.Tensor:
    total, count = torch.zeros(1, 3, *x.shape[-2:]), torch.zeros(1, 1, *x.shape[-2:])
    for r in rows:
        for c in cols:
            total[..., r : r + crop, c : c + crop] += WindowMean()(x[..., r : r + crop, c : c + crop])
            count[..., r : r + crop, c : c + crop] += 1
    return total / count


def test_slide_inference_through_the_task_and_eval_logits_resized_to_the_mask(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 9, 12)
    # stride unset: mmseg's crop * 2 // 3 = 4 -> rows 0, 3; columns 0, 4 and 6 (the last windows flush with the edge)
    task = task_for(WindowMean(), 3, inference={"mode": "slide", "crop_size": 6, "stride": None}, overlay_images=0)
    want = slide_by_hand(x, [0, 3], [0, 4, 6], 6)
    assert torch.allclose(task.predict_logits(x), want, atol=1e-6)
    strided = task_for(WindowMean(), 3, inference={"mode": "slide", "crop_size": 6, "stride": 5}, overlay_images=0)
    assert torch.allclose(strided.predict_logits(x), slide_by_hand(x, [0, 3], [0, 5, 6], 6), atol=1e-6)
    whole = task_for(WindowMean(), 3, inference={"mode": "whole"}, overlay_images=0)
    assert torch.equal(whole.predict_logits(x), WindowMean()(x))  # one window: the whole image, unpadded
    # a mask of twice the size: the logits are resized bilinearly to it before the loss and the metrics
    up = F.interpolate(want, size=(18, 24), mode="bilinear", align_corners=False)
    target = up.argmax(1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    metrics = trainer.validate(task, dataloaders=DataLoader(TensorDataset(x, target), batch_size=1), verbose=False)[0]
    assert metrics["val/pixel_acc"] == pytest.approx(1.0)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(up, target).item(), rel=1e-5)


def test_the_loss_of_a_single_labelled_pixel_is_its_cross_entropy() -> None:
    logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    target = torch.full((1, 2, 2), 255)
    target[0, 1, 0] = 2
    got = task_for(nn.Identity(), 3).criterion(logits, target)
    assert got.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-6)
