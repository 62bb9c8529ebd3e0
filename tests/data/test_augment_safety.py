"""Every transform of every recipe is safe for every op at every magnitude, on images of any mode and size."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import compose_config
from PIL import Image
from timm.data import auto_augment as aa
from timm.data.auto_augment import AugmentOp, RandAugment
from torchvision import transforms as T

from vision_mamba.data.ade20k import ADE20KDataModule
from vision_mamba.data.coco import train_transform as coco_train_transform
from vision_mamba.data.transforms import augment_ops, classification_transform, harden, posterize

# every policy family timm parses from a string (RandAugment plain and 'increasing', its max-magnitude override,
# AugMix, the AutoAugment policies); each family's op table is swept op by op below
POLICIES = ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5-inc1-mmax15", "augmix-m5-w3",
            "original", "originalr", "v0", "v0r", "3a"]
MODES = ["RGB", "L", "P", "RGBA", "LA", "CMYK", "1", "I;16", "I", "F"]
SIZES = [(1, 1), (1, 61), (47, 1), (13, 29), (96, 128)]  # (H, W)


def image(mode: str, h: int, w: int, seed: int = 0) -> Image.Image:
    """A random-content image of ``mode``, made without going through RGB where the mode has its own range."""
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        arr = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        return Image.fromarray(arr) if mode == "I;16" else Image.fromarray(arr.astype(np.int32), mode="I")
    if mode == "F":
        return Image.fromarray(rng.random((h, w)).astype(np.float32) * 255, mode="F")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def policy_ops() -> list[tuple[object, AugmentOp]]:
    """(the transform, the op) for each op name of each policy, through our hardened transform (a policy's ops of
    one name share their level function and hparams: one of them stands for all); ops of timm's table that no
    string policy uses get a RandAugment of their own, hardened the same way."""
    found = []
    for policy in POLICIES:
        t = classification_transform(True, input_size=32, auto_augment=policy)
        found += [(t, op) for op in {op.name: op for op in augment_ops(t)}.values()]
    missing = sorted(set(aa.NAME_TO_OP) - {op.name for _, op in found})
    extra = harden(T.Compose([RandAugment([AugmentOp(name, prob=1.0, magnitude=9) for name in missing])]))
    return found + [(extra, op) for op in augment_ops(extra)]


def test_every_op_at_every_magnitude_on_images_of_several_modes_and_sizes() -> None:
    pairs = policy_ops()
    assert {op.name for _, op in pairs} == set(aa.NAME_TO_OP)  # the sweep covers timm's whole op table
    # every op sees RGB (the transform's first step converts): a few modes and the degenerate sizes suffice here,
    # test_recipe_transforms_take_any_mode_and_size runs every mode through the whole transform
    images = [image(mode, h, w, seed) for seed, (mode, (h, w)) in
              enumerate(zip(["RGB", "L", "RGBA", "I;16", "CMYK", "P"], [*SIZES[:4], (16, 20), (32, 24)]))]
    for transform, op in pairs:
        to_rgb = transform.transforms[0]  # what every sample meets first in our transform
        op.prob, op.magnitude_std = 1.0, 0.0
        # 0..10 and beyond: mmax lets timm go past 10, where the 'increasing' posterize asks for negative bits
        for magnitude in [*range(11), 12, 15, 30]:
            op.magnitude, op.magnitude_max = magnitude, max(10, magnitude)
            for seed, img in enumerate(images):
                random.seed(seed)  # the random sign of rotate/shear/translate: both signs over the images
                out = op(to_rgb(img))
                assert out.mode == "RGB" and out.size == img.size, (op.name, magnitude, img.mode, img.size)


def test_magnitude_noise_is_clipped_at_both_ends() -> None:
    """mstd sampling lands on the clip bounds (0 and the max) often: those magnitudes run on every op."""
    img = image("RGB", 24, 24)
    for transform, op in policy_ops():
        op.prob = 1.0
        for std in (float("inf"), 100.0):  # uniform over [0, m], and a Gaussian clipped at both ends
            op.magnitude_std = std
            for seed in range(20):
                random.seed(seed)
                assert op(transform.transforms[0](img)).size == img.size, op.name


def test_posterize_keeps_the_high_bits_and_zero_bits_is_black() -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3, 1).reshape(16, 16, 3)
    img = Image.fromarray(arr)
    for bits in range(9):
        expected = arr & np.uint8((0xFF << (8 - bits)) & 0xFF)  # keep the `bits` most significant bits
        assert np.array_equal(np.asarray(posterize(img, bits)), expected), bits
    assert not np.asarray(posterize(img, -4)).any() and posterize(img, 12) is img


def test_hardened_transform_prints_its_rgb_step_first() -> None:
    printed = repr(classification_transform(is_training=False, input_size=32))
    assert printed.startswith("Compose(\n    ToRGB()\n    Resize(")


@pytest.mark.parametrize("data", ["imagenet", "digits"])
def test_recipe_transforms_take_any_mode_and_size(data: str) -> None:
    """The configured train and eval transforms, built by the datamodule, on every mode and size."""
    cfg = compose_config("train.yaml", [f"data={data}", "data.root=/nonexistent"]).data
    from hydra.utils import instantiate

    dm = instantiate(cfg)
    side = cfg.img_size
    for is_training in (True, False):
        t = dm.build_transform(is_training)
        for seed, mode in enumerate(MODES):
            for h, w in SIZES:
                torch.manual_seed(seed)
                random.seed(seed)
                out = t(image(mode, h, w, seed))
                assert out.shape == (3, side, side) and torch.isfinite(out).all(), (is_training, mode, h, w)


EXTREME_SHAPES = [(1, 1), (1, 500), (500, 1), (3, 3000), (3000, 3), (7, 9), (375, 500)]


def test_ade20k_pipelines_at_the_ends_of_their_ranges() -> None:
    dm = ADE20KDataModule(root="/nonexistent", img_size=64, scale=(256, 64))
    for ratio_range in ((0.5, 0.5), (2.0, 2.0)):
        dm.hparams.ratio_range = ratio_range
        dm.hparams.hflip = 1.0
        train, evaluate = dm.train_transform(), dm.eval_transform()
        for h, w in EXTREME_SHAPES:
            img, mask = np.full((h, w, 3), 200, np.uint8), np.ones((h, w), np.uint8)
            out = train(image=img, mask=mask)
            assert tuple(out["image"].shape) == (3, 64, 64) and tuple(out["mask"].shape) == (64, 64), (h, w)
            assert evaluate(image=img)["image"].shape[1:] == (h, w)


def test_coco_large_scale_jitter_at_the_ends_of_its_range() -> None:
    """Thin images (a 3x3000 panorama) at scale 0.1, where albumentations' RandomScale resizes a side to 0 px."""
    for scale_range in ((0.1, 0.1), (2.0, 2.0)):
        t = coco_train_transform(64, scale_range, hflip=1.0)
        for h, w in EXTREME_SHAPES:
            box = np.array([[0, 0, w, h]], np.float32)
            mask = np.ones((h, w), np.uint8)
            out = t(image=np.full((h, w, 3), 200, np.uint8), bboxes=box, labels=np.array([1]), index=np.array([0]),
                    masks=[mask])
            assert out["image"].shape == (64, 64, 3) and out["masks"][0].shape == (64, 64), (scale_range, h, w)
