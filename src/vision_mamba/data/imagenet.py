"""ImageNet-layout classification data: root/{train,val}/<class>/*.JPEG, with the DeiT/Vim transforms."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from vision_mamba.data.bad_files import BadFiles
from vision_mamba.data.check import SplitCheck
from vision_mamba.data.common import (
    check_enough_for_a_batch,
    check_loader_settings,
    dataset_root,
    make_loader,
    per_device_batch_size,
)
from vision_mamba.data.errors import DatasetError
from vision_mamba.data.images import check_image, read_rgb
from vision_mamba.data.resumable import ResumableDataLoader
from vision_mamba.data.transforms import classification_transform

LAYOUT_HINT = "expected the ImageNet layout: ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG"


def check_image_folder(split_dir: Path) -> list[str]:
    """Return the class names of ``split_dir``, raising a DatasetError naming the first problem found."""
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir} does not exist ({LAYOUT_HINT})")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DatasetError(f"{split_dir} has no class folders ({LAYOUT_HINT})")
    for name in classes:
        with os.scandir(split_dir / name) as entries:
            if not any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries):
                raise DatasetError(
                    f"class folder {split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)}): "
                    "add images or remove the folder"
                )
    return classes


def names_list(names: list[str], shown: int = 10) -> str:
    """``a, b, c and 7 more`` (or ``none``)."""
    if not names:
        return "none"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_same_classes(train_dir: Path, train: list[str], val_dir: Path, val: list[str]) -> None:
    """Both splits need the same class folders: name the ones that differ (a count alone sends the user back and
    forth between the two splits' ``data.num_classes``)."""
    if train == val:
        return

    only_train = names_list(sorted(set(train) - set(val)))
    only_val = names_list(sorted(set(val) - set(train)))
    raise DatasetError(
        f"the class folders of {train_dir} ({len(train)}) and {val_dir} ({len(val)}) differ: only in "
        f"{train_dir.name}/: {only_train}; only in {val_dir.name}/: {only_val}. Both splits need the "
        "same class folders (labels are the sorted folder names): add or remove these"
    )


class ImageFolderFiles(ImageFolder):
    """torchvision's ImageFolder, reading every file through :func:`read_rgb` (whole decode, any mode -> RGB, a
    one-line error naming a bad file) under a ``data.bad_images`` policy."""

    def __init__(self, root: str | Path, transform=None, bad_files: BadFiles | None = None) -> None:
        super().__init__(str(root), transform=transform, loader=read_rgb)
        self.bad_files = bad_files or BadFiles()

    def __getitem__(self, index: int):
        return self.bad_files.load(index, len(self), super().__getitem__)


class ImageFolderDataModule(LightningDataModule):
    """Image classification from folders in the ImageNet layout.

    ``batch_size`` is the global batch size; each device gets ``batch_size / world_size``. ``bad_images``: what an
    unreadable image does (``error`` | ``skip``, see :mod:`vision_mamba.data.bad_files`).
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        img_size: int = 224,
        batch_size: int = 1024,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_split: str = "train",
        val_split: str = "val",
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        train_transform: dict[str, Any] | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        repeated_aug: bool = False,
        bad_images: str = "error",
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        super().__init__()
        self.save_hyperparameters(logger=False)
        check_loader_settings(batch_size=batch_size, num_workers=num_workers)
        self.root = dataset_root(root, LAYOUT_HINT)
        self.bad_files = BadFiles(bad_images)
        self.batch_size = batch_size
        self.batch_size_per_device = batch_size
        self.data_train: ImageFolderFiles | None = None
        self.data_val: ImageFolderFiles | None = None

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def build_transform(self, is_training: bool):
        """timm's transforms, hardened (:func:`classification_transform`): RandomResizedCrop/flip/RandAugment/
        jitter/erasing for training, resize+crop for eval."""
        common = dict(
            input_size=self.hparams.img_size,
            interpolation=self.hparams.interpolation,
            mean=tuple(self.hparams.mean),
            std=tuple(self.hparams.std),
        )
        if not is_training:
            return classification_transform(False, crop_pct=self.hparams.crop_pct, **common)
        return classification_transform(True, **(self.hparams.train_transform or {}), **common)

    def check_splits(self, fit: bool) -> None:
        """The layout, before any image is read: the splits exist, hold images, the same classes (compared first,
        so that a difference is named rather than counted), and ``data.num_classes`` of them."""
        if not self.root.is_dir():
            raise DatasetError(f"data.root={self.root} does not exist ({LAYOUT_HINT})")
        hp = self.hparams
        # the training split first: its folders are the ones a user is most likely to have got wrong
        splits = [hp.train_split, hp.val_split] if fit else [hp.val_split]
        classes = {split: check_image_folder(self.root / split) for split in splits}
        if fit:
            check_same_classes(self.root / hp.train_split, classes[hp.train_split], self.root / hp.val_split,
                               classes[hp.val_split])
        for split, names in classes.items():
            if hp.num_classes is not None and len(names) != hp.num_classes:
                raise DatasetError(
                    f"{self.root / split} has {len(names)} class folders but data.num_classes={hp.num_classes}: "
                    f"set data.num_classes={len(names)} or fix the folder"
                )

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.batch_size, self.trainer)
        fit = stage in (None, "fit") and self.data_train is None
        self.check_splits(fit)
        if fit:
            self.data_train = ImageFolderFiles(self.root / self.hparams.train_split, self.build_transform(True),
                                               self.bad_files)
            check_enough_for_a_batch(len(self.data_train), self.batch_size, self.root / self.hparams.train_split)
        if self.data_val is None:
            self.data_val = ImageFolderFiles(self.root / self.hparams.val_split, self.build_transform(False),
                                             self.bad_files)
        self.bad_files.attach(self.trainer)

    def check_plan(self) -> list[SplitCheck]:
        """Every image of the training and validation splits, for ``src/check_data.py``."""
        self.check_splits(fit=True)
        plans = []
        for split in (self.hparams.train_split, self.hparams.val_split):
            folder = ImageFolder(str(self.root / split))  # the listing only: nothing is read here
            per_class = Counter(target for _, target in folder.samples).values()
            summary = {"classes": len(folder.classes), "images": len(folder.samples),
                       "images per class": f"{min(per_class)}-{max(per_class)}"}
            plans.append(SplitCheck(split, [path for path, _ in folder.samples], check_image, summary))
        return plans

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning keys it by this class's name): the class names in label order, so
        src/predict.py and src/export.py name the classes even where the data folders are gone. Every ``setup`` stage
        builds the validation split, whose classes are the training split's: empty only before ``setup``."""
        return {"class_names": list(self.data_val.classes)} if self.data_val is not None else {}

    def _loader(self, dataset, shuffle: bool, drop_last: bool, sampler=None) -> DataLoader:
        # the training loader resumes mid-epoch exactly; its shuffle seed is the one Lightning's
        # DistributedSampler uses, so 1- and N-process runs see the same global batches
        extra = {"seed": int(os.environ.get("PL_GLOBAL_SEED", 0))} if shuffle and sampler is None else {}
        return make_loader(
            dataset,
            self.hparams,
            self.batch_size_per_device,
            shuffle=shuffle if sampler is None else False,
            drop_last=drop_last,
            loader_cls=ResumableDataLoader if extra else DataLoader,
            sampler=sampler,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.hparams.repeated_aug:
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0
            sampler = RepeatAugSampler(self.data_train, num_replicas=world, rank=rank, shuffle=True)
            if len(sampler) < self.batch_size_per_device:
                raise DatasetError(
                    f"data.repeated_aug=true draws {len(sampler) * world} of the {len(self.data_train)} training "
                    f"images per epoch (whole multiples of 256), fewer than one global batch (data.batch_size="
                    f"{self.batch_size}): set data.repeated_aug=false or data.batch_size={len(sampler) * world} or less"
                )
        # drop_last: Mixup/CutMix need an even batch, and a tiny last batch skews BatchNorm-free stats less
        return self._loader(self.data_train, shuffle=True, drop_last=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        # ImageNet has no labelled test split: test on the validation split
        return self.val_dataloader()
