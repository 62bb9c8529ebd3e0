"""Embedded default data: scikit-learn's bundled digits written once into the ImageNet folder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vision_mamba.data.common import write_dataset_once
from vision_mamba.data.imagenet import ImageFolderDataModule


def write_digits_imagefolder(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the 1,797 8x8 digits as PNGs into root/{train,val}/<digit>/ (a stratified split), once.

    The folder is written under a temporary name and renamed at the end, so an interrupted write never
    leaves a half-filled dataset behind.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split


    def write(folder: Path) -> str:
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        idx_train, idx_val = train_test_split(
            np.arange(len(images)), test_size=val_fraction, random_state=seed, stratify=digits.target
        )
        for split, indices in (("train", idx_train), ("val", idx_val)):
            for i in indices:
                class_dir = folder / split / str(digits.target[i])
                class_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(class_dir / f"digit_{i:04d}.png")  # 2-D uint8: greyscale ("L")
        return f"{len(idx_train)} train, {len(idx_val)} val"

    return write_dataset_once(root, write)


class DigitsDataModule(ImageFolderDataModule):
    """The ImageNet loader over scikit-learn's digits, written to ``root`` by ``prepare_data``."""

    def __init__(
        self, root: str, val_fraction: float = 0.2, **kwargs,
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        kwargs.setdefault("num_classes", 10)
        super().__init__(root=root, **kwargs)
        self.val_fraction = val_fraction

    def prepare_data(self) -> None:
        write_digits_imagefolder(self.root, val_fraction=self.val_fraction)
