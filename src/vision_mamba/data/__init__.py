"""Datasets and LightningDataModules: real on-disk layouts (ImageNet, ADE20K, COCO) and embedded data that
writes the same layouts."""

from vision_mamba.data.digits import DigitsDataModule, write_digits_imagefolder
from vision_mamba.data.errors import DatasetError
from vision_mamba.data.imagenet import ImageFolderDataModule

__all__ = ["DatasetError", "DigitsDataModule", "ImageFolderDataModule", "write_digits_imagefolder"]
