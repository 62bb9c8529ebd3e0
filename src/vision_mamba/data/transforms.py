"""Transforms of the recipes, made safe for any image mode, size and augmentation magnitude: timm's classification
transforms (hardened), and the keep-ratio rescale the ADE20K and COCO pipelines share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment
from torchvision import transforms as T

from vision_mamba.data.images import to_rgb


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 bits gives black, as in TensorFlow's
    RandAugment (which timm's 'increasing' posterize follows, reaching 0 bits at magnitude 10).

    timm calls ``ImageOps.posterize``, which Pillow 13 refuses for 0 bits (and timm's ranges can also go below 0 with
    ``mmax`` > 10): the lookup table is built here, so no Pillow or timm range check applies.
    """
    bits = max(0, min(8, int(bits_to_keep)))
    if bits == 8:
        return img
    keep = (0xFF << (8 - bits)) & 0xFF
    return img.point([i & keep for i in range(256)] * len(img.getbands()))


class ToRGB:
    """Any PIL image -> 3-channel RGB, first in every classification transform: timm's ops (posterize, equalize,
    autocontrast, solarize) refuse RGBA, CMYK, LA, 16-bit and 1-bit images, and Normalize needs 3 channels."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def augment_ops(transform: Any) -> Iterator[AugmentOp]:
    """Every timm AugmentOp inside ``transform`` (a Compose holding RandAugment, AutoAugment or AugMix)."""
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, (RandAugment, AugMixAugment)):
            yield from t.ops
        elif isinstance(t, AutoAugment):
            for sub_policy in t.policy:
                yield from sub_policy


def harden(transform: T.Compose) -> T.Compose:
    """``transform`` with :class:`ToRGB` first and every posterize op (by name, so new variants are covered too)
    running :func:`posterize`. Only the ops of this transform change; timm's module state is left alone."""
    for op in augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return T.Compose([ToRGB(), *transform.transforms])


def classification_transform(is_training: bool, **kwargs: Any) -> T.Compose:
    """timm's ``create_transform`` (RandomResizedCrop, flip, RandAugment/AutoAugment/AugMix, RandomErasing for
    training; resize + centre crop for evaluation), hardened: see :func:`harden`."""
    return harden(create_transform(is_training=is_training, **kwargs))


class RescaleToFit(A.DualTransform):
    """mmseg's keep-ratio ``Resize(img_scale=(long, short), ratio_range)``: scale the image so that it fits in
    ``ratio * (long, short)`` (long side <= ratio * long, short side <= ratio * short, one of them equal), with the
    ratio drawn uniformly from ``ratio_range`` (1 when None). Images bilinear, masks nearest; boxes are kept
    (albumentations holds them normalised). With ``scale=(s, s)`` it is ViTDet's large-scale jitter resize (longest
    side ``s * ratio``).

    Every side stays at least one pixel, whatever the aspect ratio (albumentations' RandomScale resizes a 3x3000
    panorama to a zero-pixel side and OpenCV aborts). Albumentations' SmallestMaxSize/LongestMaxSize bound one side
    only, hence this transform.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] | None = None, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.scale = (max(scale), min(scale))
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(*self.ratio_range) if self.ratio_range else 1.0
        factor = ratio * min(self.scale[0] / max(h, w), self.scale[1] / min(h, w))
        return {"size": (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5)))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, size[::-1], interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range")
