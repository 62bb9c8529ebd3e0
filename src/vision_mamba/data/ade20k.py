"""ADE20K (ADEChallengeData2016 layout) semantic segmentation data with the mmseg training/eval pipelines."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCropAndPad
from albumentations.pytorch import ToTensorV2
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, default_collate

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
from vision_mamba.data.images import read_mask, read_rgb
from vision_mamba.data.transforms import RescaleToFit

IGNORE_INDEX = 255
DIRNAME = "ADEChallengeData2016"
LAYOUT_HINT = (
    f"expected the ADE20K release layout: ROOT/{DIRNAME}/images/{{training,validation}}/*.jpg and "
    f"ROOT/{DIRNAME}/annotations/{{training,validation}}/*.png (ROOT may also be {DIRNAME} itself)"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def resolve_root(root: str | Path) -> Path:
    """The ADEChallengeData2016 folder, given it or its parent."""
    root = Path(root)
    for candidate in (root, root / DIRNAME):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    if not root.exists():
        raise DatasetError(f"data.root={root} does not exist ({LAYOUT_HINT})")
    raise DatasetError(f"data.root={root} holds no images/ and annotations/ folders ({LAYOUT_HINT})")


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split, matched by file stem; a DatasetError names the first image without a mask."""
    image_dir, mask_dir = root / "images" / split, root / "annotations" / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist ({LAYOUT_HINT})")
    with os.scandir(image_dir) as entries:
        images = sorted(Path(e.path) for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise DatasetError(f"{image_dir} holds no images (*.jpg) ({LAYOUT_HINT})")
    with os.scandir(mask_dir) as entries:
        masks = {Path(e.name).stem: Path(e.path) for e in entries if e.name.endswith(".png")}
    pairs = []
    for image in images:
        mask = masks.get(image.stem)
        if mask is None:
            raise DatasetError(
                f"{image} has no annotation {mask_dir / (image.stem + '.png')}: every image needs a mask of the "
                "same name (or remove the image)"
            )
        pairs.append((image, mask))
    return pairs


def label_lut(num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """uint8 lookup from file labels to training labels: with reduce_zero_label, 0 ("other") -> 255, k -> k - 1."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    if reduce_zero_label:
        lut[1 : num_classes + 1] = np.arange(num_classes)
    else:
        lut[:num_classes] = np.arange(num_classes)
    return lut


class CatMaxRatioCrop(BaseCropAndPad):
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)``: a random crop (of at most the image size) re-drawn up to
    10 times while one class covers more than ``cat_max_ratio`` of its labelled pixels. Albumentations has no
    class-balance-aware crop; cropping and box/keypoint bookkeeping come from its BaseCropAndPad."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX, p: float = 1.0):
        super().__init__(pad_if_needed=False, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index,
                         pad_position="top_left", p=p)
        self.size, self.cat_max_ratio, self.ignore_index = size, cat_max_ratio, ignore_index

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.size, h), min(self.size, w)
        y0, x0 = self.py_random.randint(0, h - ch), self.py_random.randint(0, w - cw)
        return x0, y0, x0 + cw, y0 + ch

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        coords = self._draw(h, w)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                x0, y0, x1, y1 = coords
                labels, counts = np.unique(mask[y0:y1, x0:x1], return_counts=True)
                counts = counts[labels != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                coords = self._draw(h, w)
        return {"crop_coords": coords, "pad_params": None}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "cat_max_ratio", "ignore_index")


def photometric_distortion() -> list[A.BasicTransform]:
    """mmseg's PhotoMetricDistortion, each step with probability 0.5: brightness +-32, contrast x[0.5, 1.5],
    saturation x[0.5, 1.5], hue +-18 (OpenCV units, i.e. +-36 degrees)."""
    return [
        A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5),
        A.ColorJitter(brightness=0.0, contrast=0.0, saturation=(0.5, 1.5), hue=0.0, p=0.5),
        A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1, p=0.5),
    ]


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image (H, W, 3) uint8 RGB and its mask (H, W) of file labels, both as stored (no EXIF rotation: the masks
    are drawn on the stored pixels); a BadImageError names an unreadable file or a mask of another size."""
    image = np.asarray(read_rgb(image_path))
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise BadImageError.of(
            mask_path, f"is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is "
                       f"{image.shape[1]}x{image.shape[0]}", fix="a mask must have its image's size; fix the pair")
    return image, mask


def check_labels(mask: np.ndarray, mask_path: Path, num_classes: int, reduce_zero_label: bool) -> None:
    """File labels must be 0..num_classes with reduce_zero_label (0 = "other"), else 0..num_classes - 1 or 255."""
    limit = num_classes if reduce_zero_label else num_classes - 1
    if int(mask.max()) > limit:
        # without reduce_zero_label the files may already mark ignored pixels with 255
        outside = mask[(mask > limit) & ((mask != IGNORE_INDEX) | reduce_zero_label)]
        if outside.size:
            raise BadImageError.of(mask_path, f"holds label {int(outside.max())}, outside 0-{limit} for "
                                              f"data.num_classes={num_classes}",
                                   fix="fix the mask or set data.num_classes")


def label_counts(item: tuple[Path, Path, int, bool]) -> np.ndarray:
    """The data check's reading of one (image, mask, num_classes, reduce_zero_label): pixels per file label."""
    image_path, mask_path, num_classes, reduce_zero_label = item
    _, mask = read_pair(image_path, mask_path)
    check_labels(mask, mask_path, num_classes, reduce_zero_label)
    return np.bincount(mask.ravel().astype(np.int64), minlength=256)[:256]


class LabelHistogram:
    """Pixels per file label over the masks checked; printed as the range of labels the masks hold."""

    def __init__(self, reduce_zero_label: bool) -> None:
        self.counts = np.zeros(256, np.int64)
        self.ignored = 0 if reduce_zero_label else IGNORE_INDEX

    def add(self, counts: np.ndarray) -> None:
        self.counts += counts

    def __str__(self) -> str:
        present = np.flatnonzero(self.counts)
        if not len(present):
            return "no mask read"
        share = self.counts[self.ignored] / self.counts.sum()
        return (f"{present.min()}-{present.max()} ({len(present)} distinct; label {self.ignored}, ignored: "
                f"{share:.1%} of pixels)")


class SegmentationFolder(Dataset):
    """(image, mask) pairs of one split: image (3, H, W) float normalised, mask (H, W) int64 with 255 = ignore.

    Files are checked as they are read (see :func:`read_pair`, :func:`check_labels`): an unreadable image or mask, a
    mask of another size or with labels outside 0..num_classes is handled by ``bad_files`` (``data.bad_images``).
    """

    def __init__(self, pairs: list[tuple[Path, Path]], transform: A.Compose, num_classes: int,
                 reduce_zero_label: bool, resize_image: A.BasicTransform | None = None,
                 bad_files: BadFiles | None = None) -> None:
        self.pairs, self.transform, self.num_classes = pairs, transform, num_classes
        self.reduce_zero_label = reduce_zero_label
        self.lut = label_lut(num_classes, reduce_zero_label)
        # eval only: resizes the image alone, so the mask (and the metric) stay at the annotation's size
        self.resize_image = resize_image
        self.bad_files = bad_files or BadFiles()

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and its mask in training labels (255 = ignore)."""
        image_path, mask_path = self.pairs[index]
        image, mask = read_pair(image_path, mask_path)
        check_labels(mask, mask_path, self.num_classes, self.reduce_zero_label)
        return image, self.lut[mask.astype(np.int64)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bad_files.load(index, len(self), self._sample)

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read(index)
        if self.resize_image is not None:
            image = self.resize_image(image=image)["image"]
            return self.transform(image=image)["image"], torch.from_numpy(mask.astype(np.int64))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"].long()


def collate_same_size(batch: list[tuple[torch.Tensor, torch.Tensor]]):
    """Stack a batch; images of different sizes cannot be stacked, so say how to evaluate one at a time."""
    if len({tuple(x.shape) for x, _ in batch}) > 1 or len({tuple(y.shape) for _, y in batch}) > 1:
        raise DatasetError("validation images differ in size and cannot share a batch: set data.val_batch_size=1")
    return default_collate(batch)


class ADE20KDataModule(LightningDataModule):
    """ADE20K scene parsing (150 classes) with the mmseg recipe.

    Training: keep-ratio resize of ``scale`` x U(``ratio_range``), random ``img_size`` crop re-drawn while one class
    covers > ``cat_max_ratio``, horizontal flip, photometric distortion, normalise, pad to the crop with 255 in the
    mask. Evaluation: the image resized to fit ``scale`` (short side 512 for ADE20K, as mmseg) and the mask kept at
    its own size: the task predicts on the resized image (sliding window) and compares at the annotation's size.

    ``batch_size`` is the global training batch; ``val_batch_size`` is per device (1 when sizes differ, as here).
    File labels: 0 = "other" (ignored), k = class k - 1 (``reduce_zero_label``). ``bad_images``: what an unusable
    image or mask does (``error`` | ``skip``, see :mod:`vision_mamba.data.bad_files`).
    """

    def __init__(
        self,
        root: str,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        img_size: int = 512,
        batch_size: int = 16,
        val_batch_size: int = 1,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_split: str = "training",
        val_split: str = "validation",
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        class_names: Sequence[str] | None = None,
        bad_images: str = "error",
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        super().__init__()
        self.save_hyperparameters(logger=False)
        check_loader_settings(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers)
        self.root = dataset_root(root, LAYOUT_HINT)
        self.bad_files = BadFiles(bad_images)
        self.batch_size = batch_size
        self.batch_size_per_device = batch_size
        self.data_train: SegmentationFolder | None = None
        self.data_val: SegmentationFolder | None = None

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def train_transform(self) -> A.Compose:
        hp = self.hparams
        return A.Compose([
            RescaleToFit(hp.scale, hp.ratio_range),
            CatMaxRatioCrop(hp.img_size, hp.cat_max_ratio),
            A.HorizontalFlip(p=hp.hflip),
            *(photometric_distortion() if hp.photometric else []),
            A.Normalize(mean=hp.mean, std=hp.std),
            # after Normalize, as mmseg: padded pixels are 0 in normalised space and ignored in the mask
            A.PadIfNeeded(hp.img_size, hp.img_size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=IGNORE_INDEX),
            ToTensorV2(),
        ])

    def eval_transform(self) -> A.Compose:
        return A.Compose([A.Normalize(mean=self.hparams.mean, std=self.hparams.std), ToTensorV2()])

    def _dataset(self, split: str, training: bool) -> SegmentationFolder:
        hp = self.hparams
        pairs = list_pairs(resolve_root(self.root), split)
        if training:
            return SegmentationFolder(pairs, self.train_transform(), hp.num_classes, hp.reduce_zero_label,
                                      bad_files=self.bad_files)
        return SegmentationFolder(pairs, self.eval_transform(), hp.num_classes, hp.reduce_zero_label,
                                  resize_image=RescaleToFit(hp.scale), bad_files=self.bad_files)

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.batch_size, self.trainer)
        if self.data_val is None:
            self.data_val = self._dataset(self.hparams.val_split, training=False)
        if stage in (None, "fit") and self.data_train is None:
            self.data_train = self._dataset(self.hparams.train_split, training=True)
            check_enough_for_a_batch(len(self.data_train), self.batch_size,
                                     resolve_root(self.root) / "images" / self.hparams.train_split)
        self.bad_files.attach(self.trainer)

    def check_plan(self) -> list[SplitCheck]:
        """Every (image, mask) pair of the training and validation splits, for ``src/check_data.py``."""
        hp = self.hparams
        root = resolve_root(self.root)
        plans = []
        for split in (hp.train_split, hp.val_split):
            pairs = list_pairs(root, split)
            labels = LabelHistogram(hp.reduce_zero_label)
            items = [(image, mask, hp.num_classes, hp.reduce_zero_label) for image, mask in pairs]
            plans.append(SplitCheck(split, items, label_counts, {"image/mask pairs": len(pairs), "mask labels": labels},
                                    merge=labels.add))
        return plans

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, collate=None) -> DataLoader:
        return make_loader(dataset, self.hparams, batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        # drop_last: BatchNorm in the heads needs more than one sample per device
        return self._loader(self.data_train, self.batch_size_per_device, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, self.hparams.val_batch_size, shuffle=False, drop_last=False,
                            collate=collate_same_size)

    def test_dataloader(self) -> DataLoader:
        # the ADE20K test images have no public annotations: test on the validation split
        return self.val_dataloader()
