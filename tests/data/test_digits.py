"""The embedded default data: scikit-learn's digits written in the ImageNet layout, then read by the ImageNet loader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from vision_mamba.data.digits import DigitsDataModule, write_digits_imagefolder

DIGITS = load_digits()
N = len(DIGITS.target)  # 1797


def written(root: Path) -> dict[str, dict[int, int]]:
    """split -> {index of the digit named by the file: class folder}"""
    return {split: {int(p.stem.split("_")[1]): int(p.parent.name) for p in (root / split).glob("*/*")}
            for split in ("train", "val")}


def test_digits_are_written_in_the_imagenet_layout_split_by_class(tmp_path) -> None:
    root = write_digits_imagefolder(tmp_path / "digits", seed=3)  # a fifth for validation by default
    assert root == tmp_path / "digits"
    assert sorted(p.name for p in root.iterdir()) == [".complete", "train", "val"]
    files = written(root)
    n_val = math.ceil(0.2 * N)  # scikit-learn rounds the test share up
    assert (len(files["train"]), len(files["val"])) == (N - n_val, n_val)
    assert (root / ".complete").read_text() == f"{N - n_val} train, {n_val} val\n"
    assert sorted(files["train"] | files["val"]) == list(range(N))  # every digit once, in one split
    assert all(DIGITS.target[i] == label for split in files.values() for i, label in split.items())
    for split in files:
        assert sorted((root / split).iterdir()) == [root / split / str(c) for c in range(10)]
    # stratified: each class's validation share within one image of a fifth
    per_class = np.bincount(DIGITS.target)
    val_per_class = np.bincount(list(files["val"].values()), minlength=10)
    assert np.all(np.abs(val_per_class - 0.2 * per_class) <= 1), val_per_class
    # the split is scikit-learn's stratified one for this seed
    expected_val = train_test_split(np.arange(N), test_size=0.2, random_state=3, stratify=DIGITS.target)[1]
    assert sorted(files["val"]) == sorted(expected_val)
    # 8x8 greyscale PNGs, 0-16 scaled to 0-255
    for i in (0, 1, 500, N - 1):
        split = "train" if i in files["train"] else "val"
        with Image.open(root / split / str(DIGITS.target[i]) / f"digit_{i:04d}.png") as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (8, 8))
            np.testing.assert_array_equal(np.asarray(img), np.round(DIGITS.images[i] * 255 / 16))


def test_the_digits_datamodule_writes_them_in_prepare_data_and_reads_them(tmp_path) -> None:
    dm = DigitsDataModule(root=str(tmp_path / "digits"), batch_size=8, num_workers=0, img_size=16)
    assert not (tmp_path / "digits").exists()
    dm.prepare_data()
    files = written(tmp_path / "digits")
    expected_val = train_test_split(np.arange(N), test_size=0.2, random_state=0, stratify=DIGITS.target)[1]
    assert sorted(files["val"]) == sorted(expected_val)  # val_fraction 0.2 and seed 0 by default
    assert (tmp_path / "digits" / ".complete").read_text() == "1437 train, 360 val\n"
    dm.setup("fit")
    assert (dm.num_classes, len(dm.data_train), len(dm.data_val)) == (10, 1437, 360)
    assert dm.data_val.classes == [str(c) for c in range(10)]
    half = DigitsDataModule(root=str(tmp_path / "half"), val_fraction=0.5, batch_size=8)
    half.prepare_data()
    assert (tmp_path / "half" / ".complete").read_text() == f"{N - math.ceil(N / 2)} train, {math.ceil(N / 2)} val\n"
