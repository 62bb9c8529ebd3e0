"""Shape checks of the scan entry points' contracts (docs/DESIGN.md, "Contract: vim_kernels"), shared by every backend."""

from __future__ import annotations

import torch


def check_scan_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Validate the single-route (mamba_ssm layout) contract."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, L = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, N) = ({dim}, N); got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        # only the input-dependent (selective) form is supported: (batch, N, L)
        if tuple(t.shape) != (batch, N, L):
            raise ValueError(f"{name} must be (batch, N, L) = ({batch}, {N}, {L}); got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must be (batch, dim, L) like u; got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be (dim,) = ({dim},); got {tuple(t.shape)}")


def check_route_shapes(u, delta, A, B, C, D, z, delta_bias, routes) -> None:
    """Validate the multi-route contract (see docs/DESIGN.md, "Contract: vim_kernels")."""
    if u.dim() != 4 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be (R, batch, L, dim); got {tuple(u.shape)} and {tuple(delta.shape)}")
    R, batch, L, dim = u.shape
    if A.dim() != 3 or tuple(A.shape[:2]) != (R, dim):
        raise ValueError(f"A must be (R, dim, N) = ({R}, {dim}, N); got {tuple(A.shape)}")
    N = A.shape[2]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (R, batch, L, N):
            raise ValueError(f"{name} must be (R, batch, L, N) = ({R}, {batch}, {L}, {N}); got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (R, dim):
            raise ValueError(f"{name} must be (R, dim) = ({R}, {dim}); got {tuple(t.shape)}")
    if z is not None and tuple(z.shape) != (batch, L, dim):
        raise ValueError(f"z must be (batch, L, dim) = ({batch}, {L}, {dim}); got {tuple(z.shape)}")
    if routes.dim() != 2 or tuple(routes.shape) != (R, L) or routes.dtype != torch.int64:
        raise ValueError(f"routes must be int64 (R, L) = ({R}, {L}); got {routes.dtype} {tuple(routes.shape)}")
