"""COCO instance detection/segmentation data (train2017/, val2017/, annotations/instances_*.json) via pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from lightning import LightningDataModule
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from vision_mamba.data.bad_files import BadFiles
from vision_mamba.data.check import SplitCheck
from vision_mamba.data.common import (
    check_enough_for_a_batch,
    check_loader_settings,
    dataset_root,
    make_loader,
    per_device_batch_size,
)
from vision_mamba.data.errors import BadImageError, DatasetError
from vision_mamba.data.images import read_rgb
from vision_mamba.data.transforms import RescaleToFit

log = logging.getLogger(__name__)
# OpenCV's own thread pool (used by albumentations) competes with the DataLoader workers and the training step
cv2.setNumThreads(0)

LAYOUT_HINT = (
    "expected the COCO layout: ROOT/train2017/*.jpg, ROOT/val2017/*.jpg, "
    "ROOT/annotations/instances_train2017.json and ROOT/annotations/instances_val2017.json"
)


# ---- box and category conversions ----------------------------------------------------------------------------------
def xywh_to_xyxy(boxes: np.ndarray | torch.Tensor):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] (what torchvision's detectors take)."""
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float32, copy=True)
    out[..., 2] = boxes[..., 0] + boxes[..., 2]
    out[..., 3] = boxes[..., 1] + boxes[..., 3]
    return out


def xyxy_to_xywh(boxes: np.ndarray | torch.Tensor):
    """[x1, y1, x2, y2] -> COCO [x, y, w, h] (what COCO results files hold)."""
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float32, copy=True)
    out[..., 2] = boxes[..., 2] - boxes[..., 0]
    out[..., 3] = boxes[..., 3] - boxes[..., 1]
    return out


class CategoryMap:
    """COCO category ids (sparse: 1..90 for COCO) <-> contiguous labels 1..K; label 0 is torchvision's background."""

    def __init__(self, categories: Sequence[dict[str, Any]]) -> None:
        cats = sorted(categories, key=lambda c: c["id"])
        self.cat_ids = [int(c["id"]) for c in cats]
        self.names = [str(c.get("name", c["id"])) for c in cats]
        self._to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

    def __len__(self) -> int:
        return len(self.cat_ids)

    def to_label(self, cat_id: int) -> int:
        return self._to_label[int(cat_id)]

    def to_cat_id(self, label: int) -> int:
        if not 1 <= int(label) <= len(self.cat_ids):
            raise KeyError(f"label {label} is not a foreground label (1..{len(self.cat_ids)})")
        return self.cat_ids[int(label) - 1]

    def __contains__(self, cat_id: int) -> bool:
        return int(cat_id) in self._to_label


# ---- reading and checking an annotation file -----------------------------------------------------------------------
def load_coco(ann_file: Path) -> COCO:
    """Parse an instances json into a pycocotools COCO index, with a DatasetError for a missing or broken file."""
    if not ann_file.is_file():
        raise DatasetError(f"annotation file {ann_file} does not exist ({LAYOUT_HINT})")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"annotation file {ann_file} is not valid JSON ({err}): re-download or regenerate it") from err
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if not isinstance(data, dict) or missing:
        raise DatasetError(f"annotation file {ann_file} lacks {missing}: it must be a COCO instances json")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _valid_segmentation(seg: Any) -> bool:
    if isinstance(seg, list):  # polygons: each a flat [x1, y1, x2, y2, ...] with at least 3 points
        return len(seg) > 0 and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)
    return isinstance(seg, dict) and "counts" in seg and "size" in seg


def read_coco_image(path: Path, width: int, height: int, ann_name: str) -> np.ndarray:
    """An image file as a writable (H, W, 3) uint8 array, as stored (no EXIF rotation), checked against the width and
    height its json entry gives."""
    image = np.array(read_rgb(path))  # a writable copy: torch.from_numpy wants one
    h, w = image.shape[:2]
    if (w, h) != (width, height):
        raise BadImageError.of(
            path, f"is {w}x{h} but its entry in {ann_name} says {width}x{height}",
            fix="fix width/height in the json (annotations are in the stored pixel order: EXIF rotation is not "
                "applied)")
    return image


def check_coco_image(item: tuple[Path, int, int, str]) -> None:
    """The data check's reading of one (path, width, height, annotation file name)."""
    read_coco_image(*item)


class CocoInstances(Dataset):
    """One COCO split. Items are ``(image, target)``: image a float tensor (3, H, W) in [0, 1]; target a dict with
    ``boxes`` (N, 4) xyxy float, ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W) uint8 (only with ``masks``),
    ``iscrowd`` (N,), ``image_id`` and ``orig_size`` (H, W).

    Annotations are checked once, up front: those for images that are not in the file, with an unknown category, a
    degenerate box (w or h < ``min_box_size`` after clipping to the image) or, with ``masks``, an unusable
    segmentation or an RLE of another size than the image are skipped, counted and logged (``skipped``), so nothing
    fails mid-epoch. A file without any segmentation is box-only: with ``masks`` it is a DatasetError that says so
    (``task.masks=false`` trains boxes). An image listed in the json whose file is missing is a DatasetError. With
    ``train=True``, crowd annotations are dropped (torchvision's losses do not know "ignore" regions) and
    ``filter_empty`` drops images left with no annotation; evaluation keeps everything and passes ``iscrowd`` on, so
    COCO eval ignores detections on crowd regions. An image file that cannot be read, or whose size is not the json's
    width/height, is handled by ``bad_files`` (``data.bad_images``).
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: A.Compose | None = None,
        train: bool = False,
        filter_empty: bool = True,
        min_box_size: float = 1.0,
        masks: bool = True,
        bad_files: BadFiles | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.train = train
        self.masks = masks
        self.bad_files = bad_files or BadFiles()
        self.coco = load_coco(self.ann_file)
        self.categories = CategoryMap(self.coco.dataset["categories"])
        if not len(self.categories):
            raise DatasetError(f"{self.ann_file} defines no categories")
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} does not exist ({LAYOUT_HINT})")
        self._check_image_files()
        self.anns, self.skipped = self._clean_annotations(min_box_size)
        ids = sorted(self.coco.imgs)
        if train and filter_empty:
            ids = [i for i in ids if any(not a["iscrowd"] for a in self.anns.get(i, []))]
        self.ids = ids
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items() if n)
        if not self.ids:
            raise DatasetError(f"{self.ann_file} leaves no usable image in {self.image_dir}"
                               + (f" (skipped annotations: {skipped})" if skipped else ""))
        if skipped:
            log.warning(f"{self.ann_file.name}: skipped annotations: {skipped}")

    def _check_image_files(self) -> None:
        on_disk = {e.name for e in os.scandir(self.image_dir)}
        missing = [img["file_name"] for img in self.coco.imgs.values() if Path(img["file_name"]).name not in on_disk]
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) listed in {self.ann_file} are not in {self.image_dir} "
                f"(first: {missing[0]}): add the files or remove their entries from the json"
            )

    def _clean_annotations(self, min_box_size: float) -> tuple[dict[int, list[dict]], dict[str, int]]:
        skipped = {"for images not in the file": 0, "with an unknown category": 0, "with a degenerate box": 0,
                   "without a usable segmentation": 0, "with a mask of another size than its image": 0}
        kept: dict[int, list[dict]] = {}
        for ann in self.coco.dataset["annotations"]:
            img = self.coco.imgs.get(ann.get("image_id"))
            if img is None:
                skipped["for images not in the file"] += 1
                continue
            if ann.get("category_id") not in self.categories:
                skipped["with an unknown category"] += 1
                continue
            if self.masks:
                segmentation = ann.get("segmentation")
                if not _valid_segmentation(segmentation):
                    skipped["without a usable segmentation"] += 1
                    continue
                # an RLE is decoded at its own size (polygons at the image's): another size cannot be its mask
                if isinstance(segmentation, dict) and list(segmentation["size"]) != [img["height"], img["width"]]:
                    skipped["with a mask of another size than its image"] += 1
                    continue
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                skipped["with a degenerate box"] += 1
                continue
            x1, y1, x2, y2 = xywh_to_xyxy(np.asarray(bbox, dtype=np.float32)).tolist()
            x1, x2 = np.clip([x1, x2], 0, img["width"])
            y1, y2 = np.clip([y1, y2], 0, img["height"])
            if x2 - x1 < min_box_size or y2 - y1 < min_box_size:
                skipped["with a degenerate box"] += 1
                continue
            clean = dict(ann, iscrowd=int(ann.get("iscrowd", 0)), _xyxy=[float(x1), float(y1), float(x2), float(y2)])
            kept.setdefault(ann["image_id"], []).append(clean)
        if self.masks and not kept and skipped["without a usable segmentation"]:
            raise DatasetError(
                f"{self.ann_file} is a box-only file: none of its {skipped['without a usable segmentation']} "
                "annotations has a `segmentation` (polygon or RLE) for Mask R-CNN to train on: pass task.masks=false "
                "to train and evaluate boxes only (Faster R-CNN heads, box AP)"
            )
        return kept, skipped

    @property
    def num_usable(self) -> int:
        """Non-crowd annotations kept: what COCO AP is computed against (without any, AP is undefined: -1)."""
        return sum(not a["iscrowd"] for anns in self.anns.values() for a in anns)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / Path(self.coco.imgs[image_id]["file_name"]).name

    def load_image(self, image_id: int) -> np.ndarray:
        info = self.coco.imgs[image_id]
        return read_coco_image(self.image_path(image_id), info["width"], info["height"], self.ann_file.name)

    def summary(self) -> dict[str, Any]:
        """What the annotation file holds, for the data check."""
        anns = self.coco.dataset["annotations"]
        annotated = {a.get("image_id") for a in anns}
        imgs = self.coco.imgs

        def rle_of_another_size(ann: dict) -> bool:  # a usable RLE (one without a size is box-only above)
            seg, img = ann.get("segmentation"), imgs.get(ann.get("image_id"))
            return (isinstance(seg, dict) and _valid_segmentation(seg) and img is not None
                    and list(seg["size"]) != [img["height"], img["width"]])  # fmt: skip

        return {
            "images": len(imgs), "categories": len(self.categories), "annotations": len(anns),
            "crowd": sum(bool(a.get("iscrowd", 0)) for a in anns),
            "box-only (no usable segmentation)": sum(not _valid_segmentation(a.get("segmentation")) for a in anns),
            "RLE masks of another size than their image": sum(map(rle_of_another_size, anns)),
            "images without annotation": sum(i not in annotated for i in imgs),
            **{f"skipped {why}": n for why, n in self.skipped.items() if n},
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.bad_files.load(index, len(self), self._sample)

    def _sample(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        anns = [a for a in self.anns.get(image_id, []) if not (self.train and a["iscrowd"])]
        h, w = image.shape[:2]
        boxes = np.array([a["_xyxy"] for a in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.array([self.categories.to_label(a["category_id"]) for a in anns], dtype=np.int64)
        iscrowd = np.array([a["iscrowd"] for a in anns], dtype=np.int64)
        masks = None
        if self.masks:
            # annToMask decodes polygons, compressed and uncompressed RLE alike, at the image's size
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
        if self.transform is not None:
            image, boxes, labels, iscrowd, masks = self._augment(image, boxes, labels, iscrowd, masks)
        target = {
            "boxes": torch.from_numpy(boxes).float().reshape(-1, 4),
            "labels": torch.from_numpy(labels).long(),
            "iscrowd": torch.from_numpy(iscrowd).long(),
            "image_id": torch.tensor(image_id),
            "orig_size": torch.tensor([h, w]),
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks)).to(torch.uint8)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0), target

    def _augment(self, image, boxes, labels, iscrowd, masks):
        """Boxes and masks go through the same geometric ops; instances cropped away lose their mask too."""
        index = np.arange(len(boxes))
        kwargs = {"masks": list(masks)} if masks is not None and len(masks) else {}
        out = self.transform(image=image, bboxes=boxes, labels=labels, index=index, **kwargs)
        keep = np.asarray(out["index"], dtype=np.int64)
        image = out["image"]
        new_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        if masks is not None:
            if len(masks) and len(keep):
                masks = np.stack(out["masks"])[keep]
                # a crop cuts the shape, not its box: take the box of what is left of the mask (ViTDet's
                # recompute_boxes), so box and mask targets agree
                new_boxes = masks_to_boxes(masks)
            else:
                masks = np.zeros((0, *image.shape[:2]), np.uint8)
        # a box squeezed below a pixel by the down-scaling makes torchvision's box coder produce inf/nan
        ok = ((new_boxes[:, 2] - new_boxes[:, 0]) >= 1) & ((new_boxes[:, 3] - new_boxes[:, 1]) >= 1)
        return image, new_boxes[ok], labels[keep][ok], iscrowd[keep][ok], None if masks is None else masks[ok]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) binary masks -> (N, 4) xyxy pixel-edge boxes (x2 = last column + 1, like COCO's); empty -> zeros."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
        if len(cols):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def train_transform(img_size: int, scale_range: Sequence[float] = (0.1, 2.0), hflip: float = 0.5) -> A.Compose:
    """Large-scale jitter (ViTDet / Copy-Paste): longest side to img_size * U(scale_range), random crop / pad to a
    img_size square (padding at the bottom-right, so coordinates need no shift), horizontal flip."""
    return A.Compose(
        [
            RescaleToFit((img_size, img_size), scale_range),
            A.PadIfNeeded(img_size, img_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
            A.RandomCrop(img_size, img_size),
            A.HorizontalFlip(p=hflip),
        ],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "index"], min_visibility=0.0, clip=True),
    )


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images of different sizes and per-image target dicts stay lists (what torchvision's detectors take)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class CocoDataModule(LightningDataModule):
    """COCO instances for Mask R-CNN, or boxes only (``masks=False``, for Faster R-CNN and box-only files).

    Training images get large-scale jitter to an ``img_size`` square here. Evaluation images are passed at their
    original size: the detector's transform resizes the longest side to ``img_size``, pads to the square and maps
    predictions back to the original pixels, which is what COCO eval and a results json need. ``batch_size`` is the
    global batch size; each device gets ``batch_size / world_size``. An evaluation split needs at least one usable
    (non-crowd) annotation: COCO AP is undefined without ground truth. ``bad_images``: what an unusable image file
    does (``error`` | ``skip``, see :mod:`vision_mamba.data.bad_files`).
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None = 80,
        img_size: int = 1024,
        batch_size: int = 64,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        ann_file: str = "annotations/instances_{split}.json",
        scale_range: Sequence[float] = (0.1, 2.0),
        hflip: float = 0.5,
        filter_empty: bool = True,
        min_box_size: float = 1.0,
        eval_batch_size: int | None = None,
        masks: bool = True,
        bad_images: str = "error",
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        super().__init__()
        self.save_hyperparameters(logger=False)
        check_loader_settings(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.root = dataset_root(root, LAYOUT_HINT)
        self.bad_files = BadFiles(bad_images)
        self.batch_size = batch_size
        self.batch_size_per_device = batch_size
        self.data_train: CocoInstances | None = None
        self.data_val: CocoInstances | None = None
        self.data_test: CocoInstances | None = None

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    @property
    def categories(self) -> CategoryMap | None:
        """The label <-> category id map (from whichever split is loaded; all splits must agree)."""
        data = self.data_val or self.data_train or self.data_test
        return data.categories if data is not None else None

    def _split(self, split: str, train: bool) -> CocoInstances:
        hp = self.hparams
        transform = train_transform(hp.img_size, hp.scale_range, hp.hflip) if train else None
        data = CocoInstances(
            self.root / split, self.root / hp.ann_file.format(split=split), transform=transform, train=train,
            filter_empty=hp.filter_empty, min_box_size=hp.min_box_size, masks=hp.masks, bad_files=self.bad_files,
        )
        if hp.num_classes is not None and len(data.categories) != hp.num_classes:
            raise DatasetError(
                f"{data.ann_file} defines {len(data.categories)} categories but data.num_classes={hp.num_classes}: "
                f"set data.num_classes={len(data.categories)}"
            )
        if train:
            check_enough_for_a_batch(len(data), self.batch_size, f"{data.ann_file} (images with an annotation)")
        elif not data.num_usable:
            raise DatasetError(
                f"{data.ann_file} has no usable (non-crowd) annotation to evaluate against: COCO AP would be -1 and "
                "a 'best' checkpoint meaningless; use a labelled split (data.val_split / data.test_split) or fix "
                "the file (python src/check_data.py data=coco data.root=... counts what it holds)"
            )
        return data

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.batch_size, self.trainer)
        if not self.root.is_dir():
            raise DatasetError(f"data.root={self.root} does not exist ({LAYOUT_HINT})")
        hp = self.hparams
        if stage in (None, "fit", "validate") and self.data_val is None:
            self.data_val = self._split(hp.val_split, train=False)
        if stage in (None, "fit") and self.data_train is None:
            self.data_train = self._split(hp.train_split, train=True)
            if self.data_train.categories.cat_ids != self.data_val.categories.cat_ids:
                raise DatasetError(
                    f"the categories of {self.data_train.ann_file} and {self.data_val.ann_file} differ: "
                    "both splits need the same category list"
                )
        if stage in (None, "test") and self.data_test is None:
            test_split = hp.test_split or hp.val_split  # COCO's test-dev has no public labels
            self.data_test = self.data_val if test_split == hp.val_split and self.data_val else self._split(test_split, False)
        self.bad_files.attach(self.trainer)

    def check_plan(self) -> list[SplitCheck]:
        """Every image of every split (checked against its json width/height), for ``src/check_data.py``. Masks
        are not required here (the summary counts box-only annotations)."""
        hp = self.hparams
        if not self.root.is_dir():
            raise DatasetError(f"data.root={self.root} does not exist ({LAYOUT_HINT})")
        plans = []
        for split in dict.fromkeys(s for s in (hp.train_split, hp.val_split, hp.test_split) if s):
            data = CocoInstances(self.root / split, self.root / hp.ann_file.format(split=split), masks=False,
                                 min_box_size=hp.min_box_size)
            items = [(data.image_path(i), info["width"], info["height"], data.ann_file.name)
                     for i, info in data.coco.imgs.items()]
            plans.append(SplitCheck(split, items, check_coco_image, data.summary()))
        return plans

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return make_loader(
            dataset, self.hparams, batch_size, shuffle=shuffle, drop_last=shuffle, collate_fn=collate_detection
        )

    def _eval_batch(self) -> int:
        return self.hparams.eval_batch_size or self.batch_size_per_device

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True, batch_size=self.batch_size_per_device)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False, batch_size=self._eval_batch())

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False, batch_size=self._eval_batch())
