"""DetectionTask: Mask R-CNN or box-only Faster R-CNN training (torchvision losses) and COCO bbox (and segm) AP
evaluation, results json, drawings."""

from __future__ import annotations

import importlib.util
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from pycocotools import mask as mask_utils
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from vision_mamba.data.coco import xyxy_to_xywh
from vision_mamba.tasks.base import VisionTask

# faster_coco_eval prints its whole summary table at INFO on every evaluation; our own metrics are logged instead
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

# torchmetrics keys -> our names (val/bbox_mAP, val/segm_mAP_50, ...)
METRICS = {"map": "mAP", "map_50": "mAP_50", "map_75": "mAP_75", "map_small": "mAP_s", "map_medium": "mAP_m",
           "map_large": "mAP_l", "mar_100": "mAR_100"}


def coco_backend() -> str:
    """faster_coco_eval (same numbers as pycocotools, much faster) when installed, else pycocotools."""
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def to_coco_results(pred: dict[str, torch.Tensor], image_id: int, label_to_cat_id, mask_threshold: float = 0.5):
    """One image's predictions as COCO result entries: original category ids, xywh boxes, RLE segmentations."""
    boxes = xyxy_to_xywh(pred["boxes"].detach().float().cpu().numpy())  # a copy: the prediction is drawn afterwards
    masks = pred.get("masks")
    rles = None
    if masks is not None and len(masks):
        binary = (masks[:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    out = []
    for i, (box, label, score) in enumerate(zip(boxes, pred["labels"].tolist(), pred["scores"].tolist())):
        entry = {"image_id": int(image_id), "category_id": int(label_to_cat_id(label)),
                 "bbox": [round(float(v), 2) for v in box], "score": round(float(score), 5)}
        if rles is not None:
            entry["segmentation"] = {"size": list(rles[i]["size"]), "counts": rles[i]["counts"].decode("ascii")}
        out.append(entry)
    return out


class DetectionTask(VisionTask):
    """Instance detection and segmentation (``masks=True``) or box detection only (``masks=False``) with a
    torchvision-style detector.

    ``detector`` is a partial (from the config) that wraps the backbone ``net`` into the detector, e.g.
    ``VimRCNN(backbone=net, num_classes=K, masks=True)``; the detector takes a list of images (and targets when
    training) and returns torchvision's loss dict or per-image predictions. Batches are ``(list of images, list of
    targets)``; ``masks`` says whether targets and predictions carry masks (the config sets the detector's and the
    datamodule's from ``task.masks``).

    Logged: ``train/loss`` and each torchvision loss (``train/loss_classifier``, ``train/loss_box_reg``,
    ``train/loss_mask`` with masks, ``train/loss_objectness``, ``train/loss_rpn_box_reg``); ``val/bbox_mAP``,
    ``val/bbox_mAP_50``, ``val/bbox_mAP_75``, with masks ``val/segm_mAP``... (COCO AP over IoU 0.5:0.95),
    ``val/bbox_mAP_best``; the same under ``test/``. With ``write_results``, predictions go to ``<output_dir>/coco_results_{stage}.json``.
    Every validation epoch, the first validation image with objects is drawn with its predictions to
    ``<output_dir>/predictions/`` and sent to the loggers that take images.
    """

    def __init__(
        self,
        net: nn.Module,
        detector: partial,
        num_classes: int,
        masks: bool = True,
        write_results: bool = False,
        output_dir: str | None = None,
        draw_predictions: bool = True,
        draw_score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        kwargs.setdefault("optimized_metric", "val/bbox_mAP_best")
        kwargs.setdefault("monitor", "val/bbox_mAP")
        super().__init__(net=detector(backbone=net, num_classes=num_classes), **kwargs)
        # again, without the detector partial: checkpoints must stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["net", "optimizer", "detector"], logger=False)
        self.output_dir = Path(output_dir) if output_dir else None
        self.target_keys = ("boxes", "labels", "masks") if masks else ("boxes", "labels")
        self.iou_types = ("bbox", "segm") if masks else ("bbox",)
        self.metrics = nn.ModuleDict({
            stage: MeanAveragePrecision(iou_type=self.iou_types, backend=coco_backend()) for stage in ("val", "test")
        })
        self.val_map_best = MaxMetric()
        self.val_map_best.persistent(True)  # kept across a resume; sanity-check validation never updates it
        self._results: list[dict] = []
        self._drawn: tuple[torch.Tensor, dict] | None = None

    # torchvision's detection heads have data-dependent shapes (proposals, detections per image): only the backbone,
    # which sees the fixed square batch of SquarePadTransform, is compiled, without CUDA graphs (its outputs feed
    # the eager heads)
    cuda_graphs = False

    def modules_to_compile(self) -> list[nn.Module]:
        return [self.net.backbone]

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        return self.net(images, targets)


    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.net(images, [{k: t[k] for k in self.target_keys} for t in targets])
        loss = sum(losses.values())
        n = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def _label_to_cat_id(self):
        categories = getattr(getattr(self.trainer, "datamodule", None), "categories", None)
        return categories.to_cat_id if categories is not None else (lambda label: int(label))

    def _category_names(self) -> list[str] | None:
        categories = getattr(getattr(self.trainer, "datamodule", None), "categories", None)
        return list(categories.names) if categories is not None else None

    def _eval_step(self, stage: str, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> None:
        images, targets = batch
        preds = self.net(images)
        thr, masks = self.hparams.mask_threshold, self.hparams.masks
        self.metrics[stage].update(
            [{"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"],
              **({"masks": p["masks"][:, 0] > thr} if masks else {})} for p in preds],
            [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"],
              **({"masks": t["masks"].bool()} if masks else {})} for t in targets],
        )
        if self.hparams.write_results:
            to_cat = self._label_to_cat_id()
            for p, t in zip(preds, targets):
                self._results += to_coco_results(p, int(t["image_id"]), to_cat, thr)
        if stage == "val" and self._drawn is None and self.hparams.draw_predictions:
            # the first image of the epoch that has objects (an empty one would show nothing)
            for image, pred, target in zip(images, preds, targets):
                if len(target["boxes"]):
                    self._drawn = (image.detach().cpu(), {k: v.detach().cpu() for k, v in pred.items()})
                    break

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._results = []

    def on_test_epoch_start(self) -> None:
        self._results = []

    def _log_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        computed = self.metrics[stage].compute()
        self.metrics[stage].reset()
        logged = {}
        for iou in self.iou_types:
            prefix = f"{iou}_" if len(self.iou_types) > 1 else ""  # torchmetrics prefixes only with several types
            for key, name in METRICS.items():
                value = computed.get(prefix + key)
                if value is not None:
                    logged[f"{stage}/{iou}_{name}"] = value.float()
        for name, value in logged.items():  # already synced over ranks by the metric's compute()
            self.log(name, value, prog_bar=name.endswith(("bbox_mAP", "bbox_mAP_50")))
        return logged

    def on_validation_epoch_end(self) -> None:
        logged = self._log_metrics("val")
        if self.trainer.sanity_checking:
            self._drawn = None
            return
        self.val_map_best(logged["val/bbox_mAP"])
        self.log("val/bbox_mAP_best", self.val_map_best.compute(), prog_bar=True, sync_dist=True)
        self._write_results("val")
        self._save_drawing()

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        self._write_results("test")

    def _output_dir(self) -> Path:
        return self.output_dir or Path(self.trainer.default_root_dir)

    def _write_results(self, stage: str) -> None:
        if not self.hparams.write_results:
            return
        results = self._results
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        self._results = []
        self._dump(results, self._output_dir() / f"coco_results_{stage}.json")

    @rank_zero_only
    def _dump(self, results: list[dict], path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(path)

    @rank_zero_only
    def _save_drawing(self) -> None:
        if self._drawn is None:
            return
        image, pred = self._drawn
        self._drawn = None
        drawn = draw_predictions(image, pred, self._category_names(), self.hparams.draw_score_threshold,
                                 self.hparams.mask_threshold)
        folder = self._output_dir() / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(folder / f"epoch_{self.current_epoch:03d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B, Neptune, MLflow-style loggers
                logger.log_image(key="val/predictions", images=[drawn.permute(1, 2, 0).numpy()], step=self.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("val/predictions", drawn, global_step=self.global_step)


def draw_predictions(image: torch.Tensor, pred: dict[str, torch.Tensor], names: list[str] | None = None,
                     score_threshold: float = 0.5, mask_threshold: float = 0.5) -> torch.Tensor:
    """Boxes, labels with scores and masks of the confident predictions over a float image in [0, 1] -> uint8."""
    keep = pred["scores"] >= score_threshold
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if small := min(canvas.shape[-2:]) < 256:  # draw on an upscaled copy so the label text stays readable
        factor = 256 / min(canvas.shape[-2:])
        canvas = F.interpolate(canvas[None].float(), scale_factor=factor, mode="nearest")[0].to(torch.uint8)
    else:
        factor = 1.0
    boxes = pred["boxes"][keep] * factor
    if "masks" in pred and keep.any():
        masks = pred["masks"][keep][:, 0]
        if small:
            masks = F.interpolate(masks[None], size=canvas.shape[-2:], mode="bilinear")[0]
        canvas = draw_segmentation_masks(canvas, masks > mask_threshold, alpha=0.45)
    if not keep.any():
        return canvas
    labels = [
        f"{names[lab - 1] if names and 0 < lab <= len(names) else lab} {score:.2f}"
        for lab, score in zip(pred["labels"][keep].tolist(), pred["scores"][keep].tolist())
    ]
    return draw_bounding_boxes(canvas, boxes, labels=labels, colors="yellow", width=2)
