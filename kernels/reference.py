"""The oracle: a plain sequential selective scan (and its multi-route form) in float32 PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_route_shapes, check_scan_shapes


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Sequential selective scan, one time step per loop iteration (mamba_ssm's `selective_scan_fn` semantics).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias: (dim,).
    delta <- softplus(delta + delta_bias) when delta_softplus (torch's threshold of 20);
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = <C_t, h_t> + D u_t;  out = y * silu(z).
    Returns out (batch, dim, L) in u's dtype, and with return_last_state also h_L (batch, dim, N) float32.
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]  # (batch, dim, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def multi_route_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus=True):
    """Per route: gather the tokens in route order, `selective_scan_ref`, scatter back; then mean and gate.

    u, delta: (R, batch, L, dim) token order; A: (R, dim, N); B, C: (R, batch, L, N); D, delta_bias: (R, dim);
    z: (batch, L, dim) or None; routes: (R, L) int64 permutations. Returns (batch, L, dim) in u's dtype.
    """
    check_route_shapes(u, delta, A, B, C, D, z, delta_bias, routes)
    R = u.shape[0]
    acc = None
    for r in range(R):
        idx = routes[r]
        y = selective_scan_ref(
            u[r][:, idx].transpose(1, 2),
            delta[r][:, idx].transpose(1, 2),
            A[r],
            B[r][:, idx].transpose(1, 2),
            C[r][:, idx].transpose(1, 2),
            D=None if D is None else D[r],
            delta_bias=None if delta_bias is None else delta_bias[r],
            delta_softplus=delta_softplus,
        ).float()  # (batch, dim, L) in route order
        y_tok = torch.empty_like(y)
        y_tok[:, :, idx] = y  # scatter back to token order
        acc = y_tok if acc is None else acc + y_tok
    out = (acc / R).transpose(1, 2)
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(u.dtype)
