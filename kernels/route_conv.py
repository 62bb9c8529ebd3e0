"""Depthwise causal conv1d + SiLU along each scan route, read and written through the route's index map.

Every route r of a scan pattern visits the L tokens in its own order index[r] (inverse[r, t]: the step at which it
visits token t) and has its own depthwise conv (weight (E, K), bias (E,)), causal along the route:

    u[r, b, t, e] = silu(bias[r, e] + sum_i weight[r, e, i] * x[b, index[r, p - (K - 1) + i], e]),  p = inverse[r, t]

(terms with p - (K - 1) + i < 0 are zero). The reference permutes x into route order, runs F.conv1d and permutes
back; the Triton kernels gather the K taps straight from the channel-last activations, so no permuted copy of x
is written for any route (column-major and reversed routes cost what the identity route costs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends


def route_conv1d_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor):
    """x (batch, L, E), weight (R, E, K), bias (R, E), index (R, L) -> u (R, batch, L, E) in token order."""
    R, E, K = weight.shape
    L = x.shape[1]
    xt = x.transpose(1, 2)
    out = []
    for r in range(R):
        inv = torch.empty_like(index[r])
        inv[index[r]] = torch.arange(L, device=index.device)
        xr = xt[:, :, index[r]]  # route order
        c = F.conv1d(xr, weight[r].unsqueeze(1), bias[r], padding=K - 1, groups=E)[..., :L]
        out.append(F.silu(c)[:, :, inv].transpose(1, 2))
    return torch.stack(out)


def route_conv1d_silu(x, weight, bias, index, inverse=None, backend: str = "triton") -> torch.Tensor:
    """silu(depthwise causal conv1d along each route), in token order; see the module docstring.

    x: (batch, L, E) channel-last (a view with unit channel stride, e.g. half of in_proj's output, is fine);
    weight: (R, E, K); bias: (R, E); index, inverse: (R, L) int64. Returns (R, batch, L, E) in x's dtype.
    backend "triton": the gather kernels (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the reference.
    """
    if backend == "torch" or backend == "ref":
        return route_conv1d_silu_ref(x, weight, bias, index)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'torch' or 'ref'; got {backend!r}")
    backends.require_triton(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if inverse is None:
        inverse = torch.argsort(index, dim=1)
    i32 = torch.int32  # half the bytes of each gathered index (L < 2^31)
    return torch.ops.vim.route_conv_silu(x, weight, bias, index.to(i32).contiguous(), inverse.to(i32).contiguous())
