"""Embedded segmentation default: drawn circles/squares/triangles written once in the ADE20K layout."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vision_mamba.data.ade20k import DIRNAME, ADE20KDataModule
from vision_mamba.data.common import write_dataset_once

CLASS_NAMES = ("background", "circle", "square", "triangle")
# each shape class has a hue band (degrees); the bands overlap and saturation/value are random, so colour is a cue
# that gets a small CPU model started within minutes, and the outline has to settle the rest
HUES = {1: 0.0, 2: 120.0, 3: 240.0}
HUE_SPREAD = 75.0


def _shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = 4 if kind == 2 else 3
    return [(cx + r * math.cos(angle + 2 * math.pi * k / corners), cy + r * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)]


def draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One noisy RGB image (size, size, 3) and its ADE20K-style mask: 1 = background, 2/3/4 = circle/square/triangle
    (0, "other", is never used: background is a real class, so mIoU also scores where shapes are *not*).

    The background: a colour of 51-200 per channel, a left-to-right gradient of up to +-30 per channel from the centre
    column to the edges, noise of sigma 18. On it 1-3 shapes (each later one on top), each one flat colour in its
    class's hue band (``HUES`` +- ``HUE_SPREAD`` degrees, saturation and value 0.6-1), of radius 12-25% of the side
    (a triangle's corners 1.15 times as far out), circles and squares wholly inside. Over all: noise of sigma 8.
    """
    base = rng.uniform(60, 200, 3)
    ramp = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-30, 30, 3)  # a colour gradient
    image = np.clip(base * rng.uniform(0.85, 1.0) + ramp + rng.normal(0, 18, (size, size, 3)), 0, 255)
    canvas = Image.fromarray(image.astype(np.uint8))
    mask = Image.new("L", (size, size), 1)
    draw_img, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, 4)):
        kind = int(rng.integers(1, 4))
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, size - r, 2)
        hue = ((HUES[kind] + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 360) / 360
        rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))
        label = kind + 1
        if kind == 1:
            box = (cx - r, cy - r, cx + r, cy + r)
            draw_img.ellipse(box, fill=rgb)
            draw_mask.ellipse(box, fill=label)
        else:
            poly = _shape_polygon(kind, cx, cy, r * (1.0 if kind == 2 else 1.15), rng.uniform(0, 2 * math.pi))
            draw_img.polygon(poly, fill=rgb)
            draw_mask.polygon(poly, fill=label)
    noisy = np.asarray(canvas, np.float32) + rng.normal(0, 8, (size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), np.asarray(mask)


def write_shapes_ade20k(root: str | Path, num_train: int, num_val: int, size: int, seed: int = 0) -> Path:
    """Write root/ADEChallengeData2016/{images,annotations}/{training,validation}/ once (JPEG images, PNG masks).

    Written under a temporary name and renamed at the end, so an interrupted write never leaves a partial dataset.
    """

    def write(folder: Path) -> str:
        rng = np.random.default_rng(seed)
        for split, count in (("training", num_train), ("validation", num_val)):
            image_dir, mask_dir = folder / DIRNAME / "images" / split, folder / DIRNAME / "annotations" / split
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for i in range(count):
                image, mask = draw_sample(rng, size)
                name = f"shapes_{split}_{i:05d}"
                Image.fromarray(image).save(image_dir / f"{name}.jpg", quality=95)
                Image.fromarray(mask).save(mask_dir / f"{name}.png")
        return f"{num_train} training, {num_val} validation, {size}px, seed {seed}"

    return write_dataset_once(root, write)


class ShapesSegDataModule(ADE20KDataModule):
    """The ADE20K loader over drawn shapes, written to ``root`` by ``prepare_data`` (4 classes, background included)."""

    def __init__(
        self, root: str, num_train: int = 800, num_val: int = 200, image_size: int = 64, **kwargs,
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        kwargs.setdefault("num_classes", len(CLASS_NAMES))
        kwargs.setdefault("class_names", CLASS_NAMES)
        super().__init__(root=root, **kwargs)
        self.num_train, self.num_val, self.image_size = num_train, num_val, image_size

    def prepare_data(self) -> None:
        write_shapes_ade20k(self.root, self.num_train, self.num_val, self.image_size)
