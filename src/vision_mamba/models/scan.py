"""Picks the scan backend (auto | triton | torch | ref) and gives the mixer one call signature per kernel entry."""

from __future__ import annotations

import functools

import torch
import vim_kernels

BACKENDS = ("auto", "triton", "torch", "ref")


def check_backend(name: str) -> str:
    """Validate a backend name at construction time; returns it unchanged."""
    if name not in BACKENDS:
        raise ValueError(f"scan_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when vim_kernels' Triton backend can run on `device` (default: CUDA when present)."""
    return "triton" in vim_kernels.available_backends(device)


@functools.lru_cache(maxsize=64)
def _resolve(name: str, device_type: str) -> str:
    return vim_kernels.best_backend(device_type) if name == "auto" else name


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`: auto -> triton on CUDA, torch elsewhere (vim_kernels raises on
    CUDA without Triton). Explicit names pass through (the kernels raise a clear error for triton without CUDA).
    Resolved once per (name, device type), and a constant to torch.compile."""
    return _resolve(check_backend(name), torch.device(device).type)


def multi_route_scan(u, delta, A, B, C, D, z, delta_bias, routes, backend: str) -> torch.Tensor:
    """All routes of one mixer in a single call (token-order inputs, see vim_kernels.multi_route_selective_scan):
    u, delta (R, batch, L, dim); B, C (R, batch, L, N); A (R, dim, N); D, delta_bias (R, dim); z (batch, L, dim) or
    None; routes (R, L) int64. Returns (batch, L, dim) = mean_r y_r * silu(z). `backend` is a resolved name."""
    return vim_kernels.multi_route_selective_scan(u, delta, A, B, C, D, z, delta_bias, routes, True, backend)


def single_scan(u, delta, A, B, C, D, z, delta_bias, backend: str) -> torch.Tensor:
    """One route in mamba_ssm layout: u, delta, z (batch, dim, L); B, C (batch, N, L). Returns (batch, dim, L)."""
    return vim_kernels.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend=backend)


def add_rms_norm(hidden, residual, weight, eps, out_dtype, inplace: bool, backend: str):
    """A block's residual add + RMSNorm in one pass, without autograd (vim_kernels.add_rms_norm), on the block's
    scan backend: (normed in out_dtype, new float32 residual)."""
    return vim_kernels.add_rms_norm(hidden, residual, weight, eps, out_dtype, inplace=inplace, backend=backend)
