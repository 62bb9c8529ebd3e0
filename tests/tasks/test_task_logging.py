"""What each task logs, where (progress bar or not, per step and per epoch), and the epoch means it reports."""

from __future__ import annotations

import json

import pytest
import torch
from lightning import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vision_mamba.data.coco import CategoryMap, collate_detection
from vision_mamba.tasks import ClassificationTask
from vision_mamba.tasks.detection import DetectionTask
from vision_mamba.tasks.segmentation import SegmentationTask


class Scaled(nn.Module):
    """x times one trainable scalar; with_aux=True gives (x * w, x * w), the shape of a segmentor's output."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        out = x * self.w
        return (out, out) if with_aux else out


def trainer(tmp_path) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=1,
                   enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(tmp_path))


def loader(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 2) -> DataLoader:
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)


def test_classification_logs(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 0])
    task = ClassificationTask(net=Scaled(), num_classes=3, ema_decay=None, base_batch_size=None)
    t = trainer(tmp_path)
    t.fit(task, loader(logits, labels), loader(logits, labels))
    assert set(t.logged_metrics) == {"train/loss_step", "train/loss_epoch", "val/loss", "val/acc1", "val/acc5",
                                     "val/acc1_best"}
    assert set(t.progress_bar_metrics) == {"train/loss_step", "train/loss_epoch", "val/acc1", "val/acc1_best"}
    assert t.logged_metrics["val/acc1_best"] == t.logged_metrics["val/acc1"]
    t.test(task, loader(logits, labels), verbose=False)
    assert set(t.logged_metrics) == {"test/loss", "test/acc1", "test/acc5"}
    assert set(t.progress_bar_metrics) == {"test/acc1"}


def test_segmentation_logs(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 3, (4, 4, 4), generator=g)
    task = SegmentationTask(net=Scaled(), segmentor=lambda backbone: backbone, num_classes=3, base_batch_size=None,
                            inference={"mode": "whole"}, overlay_images=0)
    t = trainer(tmp_path)
    t.fit(task, loader(logits, masks), loader(logits, masks))
    assert set(t.logged_metrics) == {"train/loss_step", "train/loss_epoch", "val/loss", "val/mIoU", "val/pixel_acc",
                                     "val/mIoU_best"}
    assert set(t.progress_bar_metrics) == {"train/loss_step", "train/loss_epoch", "val/mIoU", "val/mIoU_best"}
    t.test(task, loader(logits, masks), verbose=False)
    assert set(t.logged_metrics) == {"test/loss", "test/mIoU", "test/pixel_acc"}
    assert set(t.progress_bar_metrics) == {"test/mIoU"}


class LossesOfBatchSize(nn.Module):
    """A 'detector' whose training losses are w * (batch size) and w * 10, and whose predictions are empty."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen_targets: list[dict] = []

    def forward(self, images, targets=None):
        if targets is not None:
            self.seen_targets += targets
            return {"loss_a": self.w * len(images), "loss_b": self.w * 10}
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                 "masks": torch.zeros(0, 1, 8, 8)} for _ in images]


def detection_samples(n: int) -> list[tuple[torch.Tensor, dict]]:
    return [(torch.zeros(3, 8, 8), {"image_id": i, "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
                                     "labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.uint8),
                                     "iscrowd": torch.zeros(1), "extra": torch.zeros(1)}) for i in range(n)]


def test_detection_logs_each_loss_weighted_by_batch_size(tmp_path) -> None:
    task = DetectionTask(net=nn.Identity(), detector=LossesOfBatchSize, num_classes=2, base_lr=0.0,
                         base_batch_size=None, draw_predictions=False)
    samples = detection_samples(3)
    train = DataLoader(samples, batch_size=2, collate_fn=collate_detection)  # batches of 2 and 1 images
    val = DataLoader(samples[:1], batch_size=1, collate_fn=collate_detection)
    t = trainer(tmp_path)
    t.fit(task, train, val)
    losses = ("loss", "loss_a", "loss_b")
    assert set(t.logged_metrics) == {f"train/{n}_{when}" for n in losses for when in ("step", "epoch")} | {
        f"val/{iou}_{name}" for iou in ("bbox", "segm")
        for name in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "mAR_100")} | {"val/bbox_mAP_best"}
    assert set(t.progress_bar_metrics) == {"train/loss_step", "train/loss_epoch", "val/bbox_mAP", "val/bbox_mAP_50",
                                           "val/bbox_mAP_best"}
    # epoch means weighted by images: loss_a is 2 then 1 -> (2 * 2 + 1 * 1) / 3; the total adds 10 to each
    assert t.logged_metrics["train/loss_a_epoch"].item() == pytest.approx(5 / 3)
    assert t.logged_metrics["train/loss_epoch"].item() == pytest.approx(5 / 3 + 10)
    assert t.logged_metrics["train/loss_b_step"].item() == pytest.approx(10.0)
    # the detector is handed only what torchvision's losses read
    assert [sorted(target) for target in task.net.seen_targets] == [["boxes", "labels", "masks"]] * 3


class CocoLike(LightningDataModule):
    """Two images and the contiguous-label <-> COCO-category map a CocoDataModule carries."""

    categories = CategoryMap([{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}])

    def test_dataloader(self) -> DataLoader:
        return DataLoader(detection_samples(2), batch_size=2, collate_fn=collate_detection)


class OnePrediction(LossesOfBatchSize):
    def forward(self, images, targets=None):
        return [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 7.0]]), "labels": torch.tensor([2]),
                 "scores": torch.tensor([0.75]), "masks": torch.ones(1, 1, 8, 8)} for _ in images]


def test_detection_test_stage_logs_and_writes_results_by_category_id(tmp_path) -> None:
    task = DetectionTask(net=nn.Identity(), detector=OnePrediction, num_classes=2, draw_predictions=False,
                         write_results=True, output_dir=str(tmp_path / "out"))
    t = trainer(tmp_path)
    t.test(task, datamodule=CocoLike(), verbose=False)
    assert "test/bbox_mAP" in t.logged_metrics and not any(k.startswith("val/") for k in t.logged_metrics)
    results = json.loads((tmp_path / "out" / "coco_results_test.json").read_text())
    # label 2 is the second category by id (7); boxes as COCO's x, y, width, height
    assert [(r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in results] == [
        (0, 7, [1.0, 2.0, 4.0, 5.0], 0.75), (1, 7, [1.0, 2.0, 4.0, 5.0], 0.75)]
