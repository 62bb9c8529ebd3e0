"""Datasets and LightningDataModules: real on-disk layouts (ImageNet, ADE20K, COCO) and embedded data that
writes the same layouts."""

import os

# albumentations asks PyPI for a newer version when imported unless told not to: nothing is fetched at run time
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from vision_mamba.data.digits import DigitsDataModule, write_digits_imagefolder  # noqa: E402
from vision_mamba.data.errors import BadImageError, DatasetError  # noqa: E402
from vision_mamba.data.imagenet import ImageFolderDataModule  # noqa: E402

__all__ = ["BadImageError", "DatasetError", "DigitsDataModule", "ImageFolderDataModule", "write_digits_imagefolder"]
