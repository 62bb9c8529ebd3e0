"""Soak and scale: the ImageNet recipe at the sample counts where 1-in-400 failures show, through the real loader."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate
from PIL import Image

from vision_mamba.data.transforms import augment_ops, posterize

SOAK_SAMPLES = 20_000
NUM_JPEGS = 2_000
CLASSES = [f"n{i:08d}" for i in range(10)]


def imagenet_datamodule(root: Path, *overrides: str):
    """The datamodule exactly as `data=imagenet data.root=ROOT` configures it (the real recipe)."""
    cfg = compose_config("train.yaml", ["data=imagenet", f"data.root={root}", *overrides])
    return instantiate(cfg.data)


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth, photo-like content (JPEG keeps such files small and quick), different for every image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.005, 0.05, 3)
    base = rng.uniform(30, 220, 3)
    img = base + 40 * np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def imagenet_like(tmp_path_factory) -> Path:
    """2,000 JPEGs of ImageNet-like sizes (about 500x375, landscape and portrait) in the ImageNet layout, written
    once per session; val/ holds one image per class."""
    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    scenes = [photo(rng, 500, 500) for _ in range(16)]  # crops of these, shifted in colour: cheap to make
    for i in range(NUM_JPEGS):
        w, h = int(rng.integers(400, 501)), int(rng.integers(300, 376))
        if i % 5 == 0:  # about a fifth are portrait, as in ImageNet
            w, h = h, w
        y, x = int(rng.integers(0, 501 - h)), int(rng.integers(0, 501 - w))
        pixels = scenes[i % len(scenes)][y : y + h, x : x + w] // 2 + np.uint8(i % 100)
        folder = root / "train" / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{folder.name}_{i}.JPEG", quality=85)
    for wnid in CLASSES:
        (root / "val" / wnid).mkdir(parents=True)
        Image.fromarray(photo(rng, 375, 500)).save(root / "val" / wnid / f"{wnid}_val.JPEG", quality=85)
    return root


@pytest.fixture
def one_thread():
    """One torch thread, as in a DataLoader worker (where the transform runs); the default pool's idle spinning
    would double the CPU time of these small tensor ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_20k_samples_of_the_imagenet_training_transform(tmp_path, one_thread) -> None:
    """The recipe's training transform (rand-m9-mstd0.5-inc1, RandomErasing...) at 224 px, 20,000 seeded draws:
    the 0-bit posterize (Pillow 13 refuses 0 bits; about 1 sample in 370) is met dozens of times, nothing fails."""
    transform = imagenet_datamodule(tmp_path).build_transform(is_training=True)
    zero_bits = Counter()

    def counting_posterize(img, bits_to_keep, **kwargs):
        zero_bits[int(bits_to_keep) <= 0] += 1
        return posterize(img, bits_to_keep, **kwargs)

    for op in augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = counting_posterize
    rng = np.random.default_rng(1)
    # the ops act on the 224 px crop whatever the source size: half-size sources of ImageNet's shapes cost less
    sources = [Image.fromarray(photo(rng, h, w)) for h, w in ((188, 250), (250, 188), (167, 250), (141, 250))]
    sources += [sources[0].convert("L"), sources[1].convert("CMYK")]  # ImageNet holds grey and CMYK JPEGs
    random.seed(0)
    torch.manual_seed(0)
    for i in range(SOAK_SAMPLES):
        out = transform(sources[i % len(sources)])
        assert out.shape == (3, 224, 224)
    assert zero_bits[True] >= 20, zero_bits


def test_2000_jpegs_through_the_imagenet_train_loader_with_workers(imagenet_like, one_thread) -> None:
    """The real ImageFolderDataModule train loader, two worker processes, the real recipe: one full epoch."""
    dm = imagenet_datamodule(imagenet_like, f"data.num_classes={len(CLASSES)}", "data.batch_size=100",
                             "data.num_workers=2", "data.persistent_workers=false", "data.pin_memory=false")
    dm.setup("fit")
    assert len(dm.data_train) == NUM_JPEGS
    labels = Counter()
    for images, targets in dm.train_dataloader():
        assert images.shape == (100, 3, 224, 224) and torch.isfinite(images).all()
        labels.update(targets.tolist())
    # every image once (2,000 = 20 full batches of 100), each with its folder's label
    assert labels == {k: NUM_JPEGS // len(CLASSES) for k in range(len(CLASSES))}
