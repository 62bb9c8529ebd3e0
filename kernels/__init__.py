"""vim_kernels: selective-scan (S6), route-conv, Vim-mixer and add + RMSNorm kernels for Vision Mamba (ref, torch,
Triton); the Triton ones are PyTorch custom ops (`torch.ops.vim.*`), so torch.compile traces through them."""

from .backends import BACKENDS, HAS_TRITON, available_backends, best_backend
from .interface import (
    bidirectional_selective_scan,
    mamba_inner,
    mamba_mixer_inference,
    multi_route_selective_scan,
    selective_scan,
)
from .norm import add_rms_norm, add_rms_norm_ref
from .reference import multi_route_selective_scan_ref, selective_scan_ref
from .route_conv import route_conv1d_silu, route_conv1d_silu_ref
from .scan_config import ScanConfig, select_config
from .torch_scan import multi_route_selective_scan_torch, selective_scan_torch

if HAS_TRITON:
    from .mixer_ops import MixerInferenceWeights, pack_mixer_weights

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "MixerInferenceWeights",
    "ScanConfig",
    "add_rms_norm",
    "add_rms_norm_ref",
    "available_backends",
    "best_backend",
    "bidirectional_selective_scan",
    "mamba_inner",
    "mamba_mixer_inference",
    "multi_route_selective_scan",
    "multi_route_selective_scan_ref",
    "multi_route_selective_scan_torch",
    "pack_mixer_weights",
    "route_conv1d_silu",
    "route_conv1d_silu_ref",
    "select_config",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
]
