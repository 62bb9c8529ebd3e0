"""ImageNet-layout classification data: root/{train,val}/<class>/*.JPEG, with the DeiT/Vim transforms."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from vision_mamba.data.common import dataset_root, make_loader, per_device_batch_size
from vision_mamba.data.errors import DatasetError
from vision_mamba.data.resumable import ResumableDataLoader

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


class ImageFolderDataModule(LightningDataModule):
    """Image classification from folders in the ImageNet layout.

    ``batch_size`` is the global batch size; each device gets ``batch_size / world_size``.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = dataset_root(root, LAYOUT_HINT)
        self.batch_size = batch_size
        self.batch_size_per_device = batch_size
        self.data_train: ImageFolder | None = None
        self.data_val: ImageFolder | None = None

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def build_transform(self, is_training: bool):
        """timm's transforms: RandomResizedCrop/flip/RandAugment/jitter/erasing for training, resize+crop for eval."""
        common = dict(
            input_size=self.hparams.img_size,
            interpolation=self.hparams.interpolation,
            mean=tuple(self.hparams.mean),
            std=tuple(self.hparams.std),
        )
        if not is_training:
            return create_transform(is_training=False, crop_pct=self.hparams.crop_pct, **common)
        return create_transform(is_training=True, **(self.hparams.train_transform or {}), **common)

    def _dataset(self, split: str, is_training: bool) -> ImageFolder:
        split_dir = self.root / split
        check_image_folder(split_dir)
        dataset = ImageFolder(str(split_dir), transform=self.build_transform(is_training))
        expected = self.hparams.num_classes
        if expected is not None and len(dataset.classes) != expected:
            raise DatasetError(
                f"{split_dir} has {len(dataset.classes)} class folders but data.num_classes={expected}: "
                f"set data.num_classes={len(dataset.classes)} or fix the folder"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.batch_size, self.trainer)
        if not self.root.is_dir():
            raise DatasetError(f"data.root={self.root} does not exist ({LAYOUT_HINT})")
        # the training split first: its folders are the ones a user is most likely to have got wrong
        if stage in (None, "fit") and self.data_train is None:
            self.data_train = self._dataset(self.hparams.train_split, is_training=True)
        if self.data_val is None:
            self.data_val = self._dataset(self.hparams.val_split, is_training=False)
        if self.data_train is not None and self.data_train.classes != self.data_val.classes:
            raise DatasetError(
                f"the class folders of {self.root / self.hparams.train_split} and "
                f"{self.root / self.hparams.val_split} differ: both splits need the same classes"
            )

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning keys it by this class's name): the class names in label order, so
        src/predict.py and src/export.py name the classes even where the data folders are gone."""
        data = self.data_val or self.data_train
        return {"class_names": list(data.classes)} if data is not None else {}

    def _loader(self, dataset, shuffle: bool, drop_last: bool, sampler=None) -> DataLoader:
        # [issue #8] the training loader resumes mid-epoch exactly; its shuffle seed is the one Lightning's
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
        # drop_last: Mixup/CutMix need an even batch, and a tiny last batch skews BatchNorm-free stats less
        return self._loader(self.data_train, shuffle=True, drop_last=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        # ImageNet has no labelled test split: test on the validation split
        return self.val_dataloader()
