"""Picks the selective-scan backend (auto | triton | torch | parallel | ref) and gives the mixer one call signature."""

from __future__ import annotations

import functools

import torch

# parallel: the chunked associative scan of standard tensor ops that ONNX and torch.export trace (src/export.py)
BACKENDS = ("auto", "triton", "torch", "parallel", "ref")


def check_backend(name: str) -> str:
    """Validate a backend name at construction time; returns it unchanged."""
    if name not in BACKENDS:
        raise ValueError(f"scan_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@functools.cache
def _kernels():
    try:
        import vim_kernels
    except ImportError as e:  # pragma: no cover - an install problem, not a code path
        raise ImportError(
            "the selective-scan kernels (package `vim_kernels`, folder kernels/) are not importable; "
            "reinstall the project with `pip install -e .`"
        ) from e
    return vim_kernels


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when vim_kernels' Triton backend can run on `device` (default: CUDA when present)."""
    return "triton" in _kernels().available_backends(device)


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn a backend name into the concrete backend for tensors on `device`: auto -> triton on CUDA when Triton
    imports, else torch. Explicit names pass through (the kernels raise a clear error for triton without CUDA)."""
    check_backend(name)
    return _kernels().best_backend(device) if name == "auto" else name


def multi_route_scan(
    u, delta, A, B, C, D, z, delta_bias, routes, backend: str = "auto", delta_proj=None, out=None
) -> torch.Tensor:
    """All routes of one mixer in a single call (token-order inputs, see vim_kernels.multi_route_selective_scan).

    u, delta: (R, batch, L, dim); B, C: (R, batch, L, N); A: (R, dim, N); D, delta_bias: (R, dim);
    z: (batch, L, dim) or None; routes: (R, L) int64. Returns (batch, L, dim) = mean_r y_r * silu(z).
    With delta_proj (R, dim, dt_rank), delta is the low-rank (R, batch, L, dt_rank) input; out: a buffer for the
    result where no gradient is needed (Triton only).
    """
    return _kernels().multi_route_selective_scan(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        routes,
        delta_softplus=True,
        backend=resolve_backend(backend, u.device),
        delta_proj=delta_proj,
        out=out,
    )


def project_scan_inputs(u, weight, dt_rank: int, d_state: int, backend: str = "auto"):
    """x_proj of every route: u (R, batch, L, E), weight (R, dt_rank + 2N, E) -> views dt_low, B, C. On the Triton
    backend without gradients they are views of the rows the scan reads (vim_kernels.project_scan_inputs)."""
    return _kernels().project_scan_inputs(u, weight, dt_rank, d_state, backend=resolve_backend(backend, u.device))


def single_scan(u, delta, A, B, C, D, z, delta_bias, backend: str = "auto") -> torch.Tensor:
    """One route in mamba_ssm layout: u, delta, z (batch, dim, L); B, C (batch, N, L). Returns (batch, dim, L)."""
    return _kernels().selective_scan(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=True,
        backend=resolve_backend(backend, u.device),
    )


def route_conv_silu(x, weight, bias, index, inverse, backend: str = "auto") -> torch.Tensor:
    """silu(depthwise causal conv1d along each route) for all routes, in token order: (R, batch, L, E).

    x: (batch, L, E) channel-last; weight (R, E, K); bias (R, E); index, inverse (R, L). With the triton backend
    the taps are gathered through the index maps (vim_kernels.route_conv1d_silu); otherwise the returned value
    is None and the mixer runs its F.conv1d path (identity/reversed routes without a permuted copy).
    """
    if resolve_backend(backend, x.device) != "triton":
        return None
    return _kernels().route_conv1d_silu(x, weight, bias, index, inverse, backend="triton")


def add_rms_norm(hidden, residual, weight, eps, out_dtype, inplace: bool = False, backend: str = "auto"):
    """A block's residual add + RMSNorm in one pass, without autograd (vim_kernels.add_rms_norm), on the block's
    scan backend: (normed in out_dtype, new float32 residual)."""
    backend = resolve_backend(backend, hidden.device)
    if backend == "parallel":  # the norm has no export-specific form: its torch path is plain tensor ops
        backend = "torch"
    return _kernels().add_rms_norm(hidden, residual, weight, eps, out_dtype, inplace=inplace, backend=backend)
