"""SegmentationTask: UperNet-style semantic segmentation -- CE (+ auxiliary), sliding-window eval, mIoU, overlays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from vision_mamba.tasks.base import VisionTask

IGNORE_INDEX = 255


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins along one axis (mmseg's slide): every ``stride``, the last one flush with the far edge."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(count)})


@torch.no_grad()
def slide_inference(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int,
                    crop: int, stride: int) -> torch.Tensor:
    """Logits (B, K, H, W) of ``forward`` run on crop x crop windows every ``stride`` pixels, averaged where windows
    overlap. Windows at the border of an image smaller than the crop are zero-padded to the crop (the backbone
    needs a size it can tile) and their logits cut back. All windows of the batch go through ``forward`` at once."""
    b, _, h, w = images.shape
    boxes = [(y, x) for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]
    windows = []
    for y, x in boxes:
        win = images[:, :, y : y + crop, x : x + crop]
        pad_h, pad_w = crop - win.shape[-2], crop - win.shape[-1]
        windows.append(F.pad(win, (0, pad_w, 0, pad_h)) if pad_h or pad_w else win)
    out = forward(torch.cat(windows)).float()  # (len(boxes) * B, K, crop, crop)
    logits = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i, (y, x) in enumerate(boxes):
        hh, ww = min(crop, h - y), min(crop, w - x)
        logits[:, :, y : y + hh, x : x + ww] += out[i * b : (i + 1) * b, :, :hh, :ww]
        count[:, :, y : y + hh, x : x + ww] += 1
    return logits / count


def palette() -> np.ndarray:
    """A fixed colour per class (uint8, (256, 3)); ignored pixels (255) are black."""
    colours = np.random.default_rng(3).integers(40, 256, (256, 3)).astype(np.uint8)
    colours[IGNORE_INDEX] = 0
    return colours


def overlay_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], height: int = 192) -> np.ndarray:
    """Rows of image | ground truth | prediction (uint8 HWC), each scaled to ``height`` pixels."""
    colours = palette()
    out = []
    for image, target, pred in rows:
        width = max(1, round(height * target.shape[1] / target.shape[0]))
        tiles = [Image.fromarray(image).resize((width, height), Image.BILINEAR)]
        tiles += [Image.fromarray(colours[m]).resize((width, height), Image.NEAREST) for m in (target, pred)]
        out.append(np.concatenate([np.asarray(t) for t in tiles], axis=1))
    width = max(r.shape[1] for r in out)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in out], axis=0)


class SegmentationTask(VisionTask):
    """Semantic segmentation. ``segmentor`` (a partial) wraps the backbone ``net`` with a decode head; the result
    maps (B, 3, H, W) to logits (B, K, H, W), and ``(x, with_aux=True)`` to (logits, auxiliary logits).

    Loss: cross-entropy (ignore 255) + ``aux_weight`` x the auxiliary head's. Evaluation: sliding ``crop_size``
    windows every ``stride`` pixels (``inference.mode: slide``) or one forward (``whole``); logits are resized to the
    mask's size before the argmax. Logged: ``train/loss``, ``{val,test}/{loss,mIoU,pixel_acc}``, ``val/mIoU_best``.
    An image | truth | prediction PNG goes to ``<output dir>/predictions/epoch_XXX.png`` every validation epoch, and
    to TensorBoard / W&B when those loggers are on.
    """

    def __init__(
        self,
        net: nn.Module,
        segmentor: Callable[..., nn.Module],
        num_classes: int,
        aux_weight: float = 0.4,
        inference: dict[str, Any] | None = None,
        overlay_images: int = 4,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        kwargs.setdefault("optimized_metric", "val/mIoU_best")
        kwargs.setdefault("monitor", "val/mIoU")
        super().__init__(net=segmentor(backbone=net), **kwargs)
        # again, without the segmentor partial: checkpoints must stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["net", "optimizer", "segmentor"], logger=False)
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.inference = {"mode": "slide", "crop_size": 512, "stride": None, **(inference or {})}
        if self.inference["mode"] not in ("slide", "whole"):
            raise ValueError(f"task.inference.mode must be 'slide' or 'whole', got {self.inference['mode']!r}")
        self.overlay_images = overlay_images
        self._overlay_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        self.train_loss = MeanMetric()
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            self.metrics[f"{stage}_loss"] = MeanMetric()
            self.metrics[f"{stage}_mIoU"] = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX,
                                                                  average="macro", validate_args=False)
            self.metrics[f"{stage}_pixel_acc"] = MulticlassAccuracy(num_classes, average="micro",
                                                                    ignore_index=IGNORE_INDEX, validate_args=False)
        self.val_mIoU_best = MaxMetric()
        self.val_mIoU_best.persistent(True)  # kept across a resume; sanity-check validation never updates it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # mean over labelled pixels; a batch with none gives 0, not NaN
        loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss / (target != IGNORE_INDEX).sum().clamp(min=1)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.inference["mode"] == "whole":
            return self.net(images)
        crop = int(self.inference["crop_size"])
        stride = int(self.inference["stride"] or crop * 2 // 3)  # 341 for 512, mmseg's ADE20K setting
        return slide_inference(self.net, images, self.num_classes, crop, stride)


    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.aux_weight:
            logits, aux = self.net(images, with_aux=True)
            loss = self.criterion(logits, targets) + self.aux_weight * self.criterion(aux, targets)
        else:
            loss = self.criterion(self.net(images), targets)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self.predict_logits(images)
        if logits.shape[-2:] != targets.shape[-2:]:  # eval images are resized; masks keep the annotation's size
            logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        preds = logits.argmax(1)
        m = self.metrics
        # weighted by labelled pixels: the epoch loss is the mean over every labelled pixel, whatever the batching
        m[f"{stage}_loss"](self.criterion(logits, targets), weight=(targets != IGNORE_INDEX).sum())
        m[f"{stage}_mIoU"](preds, targets)
        m[f"{stage}_pixel_acc"](preds, targets)
        self.log(f"{stage}/loss", m[f"{stage}_loss"], on_epoch=True, sync_dist=True)
        self.log(f"{stage}/mIoU", m[f"{stage}_mIoU"], on_epoch=True, prog_bar=True)
        self.log(f"{stage}/pixel_acc", m[f"{stage}_pixel_acc"], on_epoch=True)
        if stage == "val" and len(self._overlay_rows) < self.overlay_images and self.trainer.is_global_zero:
            self._keep_for_overlay(images, targets, preds)

    def _keep_for_overlay(self, images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor) -> None:
        for image, target, pred in zip(images, targets, preds):
            if len(self._overlay_rows) >= self.overlay_images:
                break
            # per-image min-max stretch: the task does not know the data's normalisation
            img = image.detach().float().cpu()
            img = ((img - img.min()) / (img.max() - img.min()).clamp(min=1e-6) * 255).byte().permute(1, 2, 0).numpy()
            self._overlay_rows.append((img, target.cpu().numpy().astype(np.uint8), pred.cpu().numpy().astype(np.uint8)))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        rows, self._overlay_rows = self._overlay_rows, []
        if self.trainer.sanity_checking:
            return
        self.val_mIoU_best(self.metrics["val_mIoU"].compute())
        self.log("val/mIoU_best", self.val_mIoU_best.compute(), sync_dist=True, prog_bar=True)
        if rows and self.trainer.is_global_zero:
            self.log_overlay(overlay_grid(rows))

    def log_overlay(self, grid: np.ndarray) -> None:
        """Save the overlay PNG in the run folder and hand it to the loggers that take images."""
        folder = Path(self.trainer.default_root_dir) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(folder / f"epoch_{self.current_epoch:03d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="val/predictions", images=[grid], step=self.global_step,
                                 caption=["image | ground truth | prediction"])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("val/predictions", grid, self.global_step, dataformats="HWC")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)
