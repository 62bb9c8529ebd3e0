"""Mask R-CNN on a plain Vim backbone: the ViTDet simple feature pyramid plus torchvision's detection heads."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-s map -> maps at ``scales`` x its resolution, plus a 'pool' level.

    x4: two 2x2 transposed convs (channels halved each time, channels-last LayerNorm + GELU between), x2: one,
    x1: identity, x0.5: 2x2 max-pool; each level then gets a 1x1 and a 3x3 conv (no bias, each followed by LN) to
    ``out_channels``. ``top_block`` adds 'pool', a stride-2 subsampling of the coarsest level (the FPN ``P6`` the RPN
    uses for the largest anchors). Keys '0'..'3' and 'pool' are what torchvision's RoI poolers and RPN expect.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: bool = True,
    ) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.out_channels = out_channels
        self.top_block = top_block
        self.stages = nn.ModuleList()
        for scale in self.scales:
            c = in_channels
            if scale == 4.0:
                layers = [
                    nn.ConvTranspose2d(c, c // 2, 2, stride=2),
                    LayerNorm2d(c // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2),
                ]
                c = c // 4
            elif scale == 2.0:
                layers, c = [nn.ConvTranspose2d(c, c // 2, 2, stride=2)], c // 2
            elif scale == 1.0:
                layers = []
            elif scale == 0.5:
                layers = [nn.MaxPool2d(2, stride=2)]
            else:
                raise ValueError(f"unsupported pyramid scale {scale}: use 4, 2, 1 or 0.5")
            # LN already shifts, so the convs carry no bias (as in ViTDet)
            layers += [
                nn.Conv2d(c, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        if self.top_block:
            out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


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


class VimMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN with a Vim backbone and a simple feature pyramid (the ViTDet design).

    ``num_classes`` counts foreground classes (labels 1..K; torchvision's background 0 is added here). One anchor
    size per pyramid level ('0'..'3' at strides 4..32 for a stride-16 backbone, and 'pool'), three aspect ratios;
    RoIAlign over levels '0'..'3' (7x7 for boxes, 14x14 for masks). Input: a list of float images (3, H, W) in
    [0, 1]; see :class:`SquarePadTransform` for the resizing and padding. Call ``forward(images, targets)`` in train
    mode for the loss dict, ``forward(images)`` in eval mode for per-image ``boxes``/``labels``/``scores``/``masks``.

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
        box_pool = MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(featmap_names=levels, output_size=14, sampling_ratio=2)
        super().__init__(
            features,
            num_classes=None,
            rpn_anchor_generator=anchors,
            box_roi_pool=box_pool,
            box_head=TwoMLPHead(out_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(out_channels, [mask_channels] * mask_convs, dilation=1),
            mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
            **kwargs,
        )
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
