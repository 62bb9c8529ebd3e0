"""vim_kernels: selective-scan (S6), route-conv and add + RMSNorm kernels for Vision Mamba (ref, torch, parallel, Triton)."""

from .interface import (
    BACKENDS,
    available_backends,
    best_backend,
    bidirectional_selective_scan,
    multi_route_selective_scan,
    project_scan_inputs,
    selective_scan,
)
from .norm import add_rms_norm, add_rms_norm_ref
from .parallel_scan import multi_route_selective_scan_parallel, selective_scan_parallel
from .reference import multi_route_selective_scan_ref, selective_scan_ref
from .route_conv import route_conv1d_silu, route_conv1d_silu_ref
from .torch_scan import multi_route_selective_scan_torch, selective_scan_torch

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "add_rms_norm_ref",
    "available_backends",
    "best_backend",
    "bidirectional_selective_scan",
    "multi_route_selective_scan",
    "multi_route_selective_scan_parallel",
    "multi_route_selective_scan_ref",
    "multi_route_selective_scan_torch",
    "project_scan_inputs",
    "route_conv1d_silu",
    "route_conv1d_silu_ref",
    "selective_scan",
    "selective_scan_parallel",
    "selective_scan_ref",
    "selective_scan_torch",
]
