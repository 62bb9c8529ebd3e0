"""vim_kernels: selective-scan (S6) and route-conv kernels for Vision Mamba -- reference, PyTorch and Triton backends."""

from .interface import (
    BACKENDS,
    available_backends,
    best_backend,
    bidirectional_selective_scan,
    multi_route_selective_scan,
    selective_scan,
)
from .reference import multi_route_selective_scan_ref, selective_scan_ref
from .route_conv import route_conv1d_silu, route_conv1d_silu_ref
from .torch_scan import multi_route_selective_scan_torch, selective_scan_torch

__all__ = [
    "BACKENDS",
    "available_backends",
    "best_backend",
    "bidirectional_selective_scan",
    "multi_route_selective_scan",
    "multi_route_selective_scan_ref",
    "multi_route_selective_scan_torch",
    "route_conv1d_silu",
    "route_conv1d_silu_ref",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
]
