"""VisionMamba (Vim, bimamba v2 with the middle class token) and its timm-registered variants."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from vision_mamba.models import scan
from vision_mamba.models.checkpoints import checkpoint_filter_fn, load_pretrained, resize_pos_embed
from vision_mamba.models.mixer import MultiRouteMamba, ScanRoutes, get_scan_pattern
from vision_mamba.models.scan import check_backend

__all__ = ["VisionMamba", "PatchEmbed", "RMSNorm", "MambaBlock", "checkpoint_filter_fn"]


class ImageSizeError(ValueError):
    """An image size the patch grid cannot tile (a user input error: the entry points print it without a traceback)."""

    user_error = True


class PatchEmbed(nn.Module):
    """Conv2d patch embedding; the stride may be smaller than the patch (overlapping '+' variants)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
    ):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size, self.stride = patch_size, stride
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid of an image: ((H - patch) / stride + 1, (W - patch) / stride + 1)."""
        h, w = img_size
        p, s = self.patch_size, self.stride
        if h < p or w < p or (h - p) % s or (w - p) % s:
            raise ImageSizeError(
                f"input {h}x{w} does not tile into {p}px patches at stride {s}: "
                f"need H, W >= {p} and (H - {p}), (W - {p}) divisible by {s}"
            )
        return (h - p) // s + 1, (w - p) // s + 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, M, D) in row-major order, and the grid (H', W')."""
        grid = self.feat_size(x.shape[-2:])
        if self.stride != self.patch_size:
            return self.proj(x).flatten(2).transpose(1, 2), grid
        # non-overlapping patches: the conv is one GEMM over the flattened patches. cuDNN's bf16 conv took 1.56 of
        # vim_tiny's 51 ms at 1248 px (H100); the patch copy and GEMM take ~0.4 ms (benchmarks/README.md)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # what the conv would have cast to, before the copy
        (b, c), p = x.shape[:2], self.patch_size
        patches = x.reshape(b, c, grid[0], p, grid[1], p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias), grid


class RMSNorm(nn.Module):
    """RMS normalisation with a weight and no bias, computed in float32 (returns float32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MambaBlock(nn.Module):
    """Vim's add -> norm -> mixer block: residual += drop_path(previous mixer output); hidden = mixer(norm(residual)).

    The residual stream is float32. Returns (hidden, residual); `residual` is the previous block's output.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, routes: ScanRoutes, inplace: bool = False):
        """inplace (no gradients only): the new residual may be written over `residual` and the normed input over
        `hidden` (the caller keeps neither)."""
        if torch.is_grad_enabled() or (self.training and not isinstance(self.drop_path, nn.Identity)):
            residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
            return self.mixer(self.norm(residual), routes), residual
        # inference: the add and the norm in one pass (vim_kernels.add_rms_norm), the output already in the dtype the
        # mixer's in_proj takes under autocast (same values: it would cast the float32 norm to it)
        dev = hidden.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        backend = scan.resolve_backend(self.mixer.scan_backend, hidden.device)
        normed, residual = scan.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, out_dtype, inplace, backend)
        return self.mixer(normed, routes), residual


class VisionMamba(nn.Module):
    """Vision Mamba: patch tokens with a class token in the middle, a stack of multi-route Mamba blocks, final RMSNorm,
    and a linear head on the middle class token (hustvl/Vim, bimamba v2, middle cls token, abs pos embed)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        scan: str = "bidirectional",
        scan_backend: str = "auto",
        scan_path: str = "fused",
        save_scan_states: bool = False,
        dynamic_img_size: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth = depth
        self.patch_stride = stride or patch_size
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.scan_pattern = get_scan_pattern(scan)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, self.patch_stride, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        layer_dpr = [0.0] + dpr[:-1]  # block i adds the output of block i - 1, so it takes block i - 1's rate
        mixer = partial(
            MultiRouteMamba,
            pattern=self.scan_pattern,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            num_layers=depth,
            scan_backend=scan_backend,
            path=scan_path,
            save_scan_states=save_scan_states,
        )
        self.layers = nn.ModuleList(
            MambaBlock(embed_dim, mixer(embed_dim), layer_dpr[i], norm_eps) for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=self.patch_stride, module=f"layers.{i}") for i in range(depth)
        ]
        self.init_weights()

    # ---- init & timm plumbing --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """Official init: lecun-normal patch conv, trunc-normal(0.02) head/pos_embed/cls_token, zero Linear biases
        (dt_proj keeps its softplus^-1 bias; the mixers initialise themselves)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters kept out of weight decay: pos_embed, cls_token and every A_log / D twin."""
        names = {"pos_embed", "cls_token"}
        for i, layer in enumerate(self.layers):
            names |= {f"layers.{i}.mixer.{n}" for n in layer.mixer.no_weight_decay_names()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        if global_pool not in (None, "token"):
            raise ValueError(f"VisionMamba pools the middle class token only; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_scan_backend(self, backend: str):
        """auto | triton | torch | ref for every mixer (e.g. `ref` to check a run against the sequential oracle)."""
        for layer in self.layers:
            layer.mixer.scan_backend = check_backend(backend)

    def set_scan_path(self, path: str):
        """'fused' (one multi-route scan per block) or 'reference' (one scan per route; the oracle)."""
        for layer in self.layers:
            layer.mixer.path = path

    # ---- forward ---------------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], ScanRoutes]:
        """Patch tokens + middle class token + position embedding; the routes for this grid."""
        if not self.dynamic_img_size and tuple(x.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} != img_size {self.patch_embed.img_size} and dynamic_img_size=False"
            )
        x, grid = self.patch_embed(x)
        mid = x.shape[1] // 2
        x = torch.cat([x[:, :mid], self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, mid:]], dim=1)
        x = x + resize_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid)
        routes = self.scan_pattern.routes(grid[0], grid[1], mid, x.device)
        return self.pos_drop(x), grid, routes

    def _block(self, i: int, hidden, residual, routes, inplace: bool = False):
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self.layers[i], hidden, residual, routes, use_reentrant=False)
        return self.layers[i](hidden, residual, routes, inplace=inplace)

    def _block_output(self, k: int, hidden, residual) -> torch.Tensor:
        """Output of block k - 1 when blocks 0..k-1 ran: what block k (or the final add) would compute."""
        drop = self.layers[k].drop_path if k < len(self.layers) else self.drop_path
        return residual + drop(hidden).float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normed tokens (B, L + 1, C), class token at index L // 2 of the L patches."""
        hidden, _, routes = self._embed(x)
        residual = None
        for i in range(len(self.layers)):
            hidden, residual = self._block(i, hidden, residual, routes, inplace=True)
        return self.norm_f(self._block_output(len(self.layers), hidden, residual))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, (x.shape[1] - 1) // 2]  # the middle class token
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Block outputs (residual + hidden after a block) as feature maps, timm style.

        indices: last n blocks if int, all if None, those listed otherwise. output_fmt 'NCHW' gives (B, C, H', W')
        maps of the patch tokens (class token removed), 'NLC' gives (B, H'*W', C). norm applies norm_f to each.
        Returns the list if intermediates_only, else (normed final tokens, list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        take = set(take)
        batch = x.shape[0]
        hidden, (gh, gw), routes = self._embed(x)
        num_blocks = max_index + 1 if (stop_early or intermediates_only) else len(self.layers)
        outputs, residual = [], None
        for i in range(num_blocks):
            # block i may overwrite its input residual (block i - 2's output) unless that was taken
            hidden, residual = self._block(i, hidden, residual, routes, inplace=i - 2 not in take)
            if i - 1 in take:
                outputs.append(residual)  # block i's input residual is block i-1's output
        last = self._block_output(num_blocks, hidden, residual)
        if num_blocks - 1 in take:
            outputs.append(last)

        mid = gh * gw // 2
        if norm:
            outputs = [self.norm_f(y) for y in outputs]
        prefix = [y[:, mid : mid + 1] for y in outputs]
        feats = [torch.cat([y[:, :mid], y[:, mid + 1 :]], dim=1) for y in outputs]
        if output_fmt == "NCHW":
            feats = [y.reshape(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in feats]
        if return_prefix_tokens:
            feats = list(zip(feats, prefix))
        if intermediates_only:
            return feats
        if num_blocks < len(self.layers):
            raise ValueError("the final features need every block; pass stop_early=False")
        return self.norm_f(last), feats

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last wanted intermediate (and norm_f / head if asked)."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take


# --------------------------------------------------------------------------------------------------------------------
# timm registration
# --------------------------------------------------------------------------------------------------------------------


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vim_tiny_patch16_224": _cfg(),
        "vim_small_patch16_224": _cfg(),
        "vim_base_patch16_224": _cfg(),
        "vim_tiny_patch16_stride8_224": _cfg(),
        "vim_small_patch16_stride8_224": _cfg(),
        "vim_digits": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3),
    }
)


def _create_vim(variant: str, pretrained: bool = False, pretrained_path: str | None = None, **kwargs) -> VisionMamba:
    if pretrained:
        raise ValueError(
            f"{variant}: weights are not downloaded; load a local file instead with "
            f"timm.create_model({variant!r}, pretrained_path='/path/to/checkpoint.pth') "
            "(Hydra: model.pretrained=/path/to/checkpoint.pth)"
        )
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(
        VisionMamba,
        variant,
        pretrained=False,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    return model


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti: 7.1M parameters with 1000 classes."""
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(dict(embed_dim=192, depth=24), **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S."""
    return _create_vim("vim_small_patch16_224", pretrained, **dict(dict(embed_dim=384, depth=24), **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B."""
    return _create_vim("vim_base_patch16_224", pretrained, **dict(dict(embed_dim=768, depth=24), **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti+ (long sequence: 16px patches at stride 8, 27x27 tokens at 224)."""
    args = dict(embed_dim=192, depth=24, stride=8)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S+ (long sequence: 16px patches at stride 8)."""
    args = dict(embed_dim=384, depth=24, stride=8)
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_digits(pretrained: bool = False, **kwargs) -> VisionMamba:
    """A small Vim for the embedded digits data (8x8 digits upscaled to 32): 4px patches, 8x8 tokens, 4 blocks."""
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_classes=10)
    return _create_vim("vim_digits", pretrained, **dict(args, **kwargs))
