"""Mask R-CNN (or Faster R-CNN, for boxes only) on a plain Vim backbone: the ViTDet simple feature pyramid plus
torchvision's detection heads."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from vision_mamba.models.necks import SimpleFeaturePyramid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VimPyramidBackbone(nn.Module):
    """The detector's ``backbone``: Vim (``body``) -> its last block's stride-16 map -> SimpleFeaturePyramid (``fpn``).

    Named like torchvision's BackboneWithFPN (body / fpn) and exposing ``out_channels``, as torchvision's detectors
    require. The backbone's classifier is dropped (``reset_classifier(0)``); its final norm is applied to the last
    block output (so no backbone parameter goes unused, which DDP would reject).
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        norm_last: bool = True,
    ) -> None:
        super().__init__()
        body.reset_classifier(0)
        self.body = body
        self.norm_last = norm_last
        self.fpn = SimpleFeaturePyramid(body.embed_dim, out_channels, scales)
        self.out_channels = out_channels
        self.num_levels = len(scales)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        (last,) = self.body.forward_intermediates(
            x, indices=[self.body.depth - 1], norm=self.norm_last, output_fmt="NCHW", intermediates_only=True
        )
        return self.fpn(last)


class SquarePadTransform(GeneralizedRCNNTransform):
    """torchvision's normalise/resize/batch step, fitted to a fixed-size plain backbone.

    Resizes the longest side to ``img_size`` (skipped when it already is: the datamodule's large-scale jitter hands
    over ``img_size`` squares, and resizing again would cost time and blur masks), then pads every image at the
    bottom-right to one ``img_size`` square (ViTDet's square padding), rounded up to ``size_divisible``.
    Predictions are mapped back to each input's own size by torchvision's postprocess.
    """

    def __init__(self, img_size: int, size_divisible: int, image_mean: Sequence[float], image_std: Sequence[float]):
        super().__init__(img_size, img_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        self.img_size = img_size

    def resize(self, image: torch.Tensor, target: dict | None = None):
        if max(image.shape[-2:]) == self.img_size:
            return image, target
        return super().resize(image, target)

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        side = max(self.img_size, *(max(img.shape[-2:]) for img in images))
        side = int(math.ceil(side / size_divisible) * size_divisible)
        batched = images[0].new_zeros(len(images), images[0].shape[0], side, side)  # 0 = the mean after normalising
        for img, slot in zip(images, batched):
            slot[:, : img.shape[1], : img.shape[2]].copy_(img)
        return batched


class VimRCNN(FasterRCNN):
    """torchvision's Mask R-CNN (``masks=True``) or Faster R-CNN (``masks=False``: boxes only, e.g. for a box-only
    dataset) with a Vim backbone and a simple feature pyramid (the ViTDet design).

    ``num_classes`` counts foreground classes (labels 1..K; torchvision's background 0 is added here). One anchor
    size per pyramid level ('0'..'3' at strides 4..32 for a stride-16 backbone, and 'pool'), three aspect ratios;
    RoIAlign over levels '0'..'3' (7x7 for boxes, 14x14 for masks). Input: a list of float images (3, H, W) in
    [0, 1]; see :class:`SquarePadTransform` for the resizing and padding. Call ``forward(images, targets)`` in train
    mode for the loss dict, ``forward(images)`` in eval mode for per-image ``boxes``/``labels``/``scores`` (and
    ``masks``). The mask branch is added to the RoI heads exactly as torchvision's ``MaskRCNN`` adds it, so a
    ``masks=True`` model is a Mask R-CNN, with its state-dict keys; ``masks=False`` has no ``roi_heads.mask_*``.

    No Cascade variant: torchvision has no cascade RoI heads (only the single-stage RoIHeads), and a cascade would
    mean rewriting its box sampling, decoding and loss by hand; use detectron2 or mmdet if you need Cascade Mask R-CNN.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        img_size: int = 1024,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        representation_size: int = 1024,
        masks: bool = True,
        mask_channels: int = 256,
        mask_convs: int = 4,
        norm_last: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ) -> None:
        stride = int(backbone.patch_stride)
        # the pyramid's x0.5 level max-pools the stride-16 grid: the padded side must divide by 2 * stride
        size_divisible = 2 * stride
        if img_size % size_divisible:
            raise ValueError(
                f"img_size={img_size} must be a multiple of {size_divisible} (2 x the patch stride {stride})"
            )
        features = VimPyramidBackbone(backbone, out_channels, scales, norm_last=norm_last)
        levels = [str(i) for i in range(len(scales))]
        num_maps = len(scales) + 1  # + 'pool'
        if len(anchor_sizes) != num_maps:
            raise ValueError(f"anchor_sizes needs one size per pyramid level ({num_maps}), got {list(anchor_sizes)}")
        anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * num_maps)
        super().__init__(
            features,
            num_classes=None,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(out_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            **kwargs,
        )
        if masks:
            self.roi_heads.mask_roi_pool = MultiScaleRoIAlign(featmap_names=levels, output_size=14, sampling_ratio=2)
            self.roi_heads.mask_head = MaskRCNNHeads(out_channels, [mask_channels] * mask_convs, dilation=1)
            self.roi_heads.mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1)
        self.masks = masks
        self.transform = SquarePadTransform(img_size, size_divisible, image_mean, image_std)
        self.num_classes = num_classes
        self.img_size = img_size

    # ---- optimiser plumbing: layer-wise lr decay (timm) and weight-decay exclusions ---------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """The Vim's groups under ``backbone.body.``; pyramid and heads match nothing, so they land in the last group
        and keep the full lr (ViTDet's layer-wise decay)."""

        def prefixed(pattern):
            # the backbone's patterns are anchored alternatives (^a|^b): anchor each one below `backbone.body.`
            if isinstance(pattern, str):
                return pattern.replace("^", r"^backbone\.body\.")
            return [(prefixed(p), rest) for p, rest in pattern]

        return {name: prefixed(p) for name, p in self.backbone.body.group_matcher(coarse).items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        body = self.backbone.body
        inner = body.no_weight_decay() if hasattr(body, "no_weight_decay") else set()
        return {f"backbone.body.{name}" for name in inner}
