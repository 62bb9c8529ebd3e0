"""Feature pyramids for dense tasks: the one-stride maps of a plain backbone turned into a multi-level pyramid
(UperNet's, from several blocks; ViTDet's simple feature pyramid, from the last block, for the detectors)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


def evenly_spaced_indices(depth: int, levels: int = 4) -> list[int]:
    """The last block of each of ``levels`` equal slices of the stack: depth 24 -> [5, 11, 17, 23], 4 -> [0, 1, 2, 3]."""
    if depth < levels:
        raise ValueError(f"a backbone of depth {depth} cannot give {levels} distinct feature levels")
    return [(i + 1) * depth // levels - 1 for i in range(levels)]


def pyramid_scales(patch_stride: int, strides: Sequence[int] = (4, 8, 16, 32)) -> tuple[float, ...]:
    """How much each level resamples a stride-``patch_stride`` map: stride 16 -> (4, 2, 1, 0.5), 8 -> (2, 1, 0.5, 0.25)."""
    return tuple(patch_stride / s for s in strides)


def _rescale(channels: int, scale: float) -> nn.Module:
    """x4: two 2x2 transposed convs with BN + GELU between; x2: one; x1: identity; x0.5 / x0.25: max-pool.

    These are the BEiT/ViTDet-style resamplers that UperNet-on-ViT recipes (BEiT, Vim) use on their plain maps.
    """
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(channels),  # becomes SyncBatchNorm under DDP with trainer.sync_batchnorm=true
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        )
    if scale == 2:
        return nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
    if scale == 1:
        return nn.Identity()
    if scale in (0.5, 0.25):
        k = round(1 / scale)
        return nn.MaxPool2d(kernel_size=k, stride=k)
    raise ValueError(f"unsupported pyramid scale {scale}: use 4, 2, 1, 0.5 or 0.25")


class PlainFeaturePyramid(nn.Module):
    """Maps N same-stride maps (B, C, H, W) to N maps at ``scales`` times that resolution.

    With a stride-16 backbone and the default scales (4, 2, 1, 0.5) the outputs have strides 4, 8, 16 and 32, the
    pyramid UperNet expects. Each level resamples its own input map (the output of a different block).
    """

    def __init__(self, channels: int, scales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.levels = nn.ModuleList(_rescale(channels, s) for s in self.scales)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps, got {len(features)}")
        return [level(x) for level, x in zip(self.levels, features)]


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
