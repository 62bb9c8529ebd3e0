"""UperNet (pyramid pooling + FPN fusion) and an auxiliary FCN head on a plain backbone: the Segmentor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision_mamba.models.necks import PlainFeaturePyramid, evenly_spaced_indices, pyramid_scales


def conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    # no conv bias: the BatchNorm that follows has its own shift
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the map average-pooled to s x s for each s, projected, upsampled, and concatenated
    with the map itself, then fused by a 3x3 conv."""

    def __init__(self, cin: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels)) for s in pool_scales
        )
        self.bottleneck = conv_bn_relu(cin + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet decode head: PPM on the coarsest level, a top-down FPN over the others, all levels upsampled to the
    finest one and fused by a 3x3 conv; logits at the finest level's resolution."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        *fine, coarsest = in_channels
        self.ppm = PyramidPooling(coarsest, channels, pool_scales)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels) for c in fine)
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in fine)
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        *fine, coarsest = features
        laterals = [lat(x) for lat, x in zip(self.lateral, fine)] + [self.ppm(coarsest)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: ``num_convs`` 3x3 conv-BN-ReLU then a 1x1 classifier, on one pyramid level."""

    def __init__(self, cin: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(conv_bn_relu(cin if i == 0 else channels, channels, 3) for i in range(num_convs)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class Segmentor(nn.Module):
    """Plain backbone -> 4 block outputs -> PlainFeaturePyramid -> UperNet (+ auxiliary FCN on the third level).

    The pyramid has output ``strides`` (4, 8, 16, 32) whatever the backbone's patch stride (16: deconv x2, deconv,
    identity, max-pool; 8: deconv, identity, max-pool 2, max-pool 4, as Vim's own segmentation backbone).

    The backbone is any module with the timm ``forward_intermediates`` contract and ``embed_dim`` / ``depth``
    attributes. Its classifier (and its final norm, which no block output goes through) is dropped.
    ``forward(x)`` returns logits (B, num_classes, H, W) at the input size; ``forward(x, with_aux=True)`` also the
    auxiliary logits at the input size (training only needs them).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        channels: int | None = None,
        out_indices: Sequence[int] | None = None,
        strides: Sequence[int] = (4, 8, 16, 32),
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_channels: int | None = 256,
        aux_level: int = 2,
    ) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.out_indices = list(out_indices) if out_indices is not None else evenly_spaced_indices(backbone.depth)
        if hasattr(backbone, "prune_intermediate_layers"):
            # also swaps the unused final norm for an Identity, so DDP finds no parameter without a gradient
            backbone.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        else:
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.neck = PlainFeaturePyramid(dim, pyramid_scales(backbone.patch_stride, strides))
        channels = channels or dim  # Vim's UperNet uses channels = embed dim
        self.decode_head = UperNetHead([dim] * len(strides), channels, num_classes, pool_scales, dropout)
        self.aux_level = aux_level
        self.aux_head = FCNHead(dim, aux_channels, num_classes, dropout=dropout) if aux_channels else None

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone.forward_intermediates(
            x, indices=self.out_indices, output_fmt="NCHW", intermediates_only=True
        )
        return self.neck(feats)

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pyramid = self.pyramid(x)
        logits = resize(self.decode_head(pyramid), x.shape[-2:])
        if not with_aux:
            return logits
        if self.aux_head is None:
            raise ValueError("with_aux=True needs an auxiliary head (aux_channels > 0)")
        return logits, resize(self.aux_head(pyramid[self.aux_level]), x.shape[-2:])

    # ---- optimiser plumbing: layer-wise lr decay (timm) and weight-decay exclusions ---------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's groups under ``backbone.``; neck and heads match nothing, so they form the last group and
        keep the full lr (as in the BEiT/Vim layer-decay optimiser)."""

        def prefixed(pattern):
            # the backbone's patterns are anchored alternatives (^a|^b): anchor each one below `backbone.`
            if isinstance(pattern, str):
                return pattern.replace("^", r"^backbone\.")
            return [(prefixed(p), rest) for p, rest in pattern]

        return {name: prefixed(p) for name, p in self.backbone.group_matcher(coarse).items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in inner}
