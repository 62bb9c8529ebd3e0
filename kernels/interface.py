"""Functional API of vim_kernels: the selective scans and the Vim mixer ops, dispatching to the ref, torch or triton
backend (docs/DESIGN.md, "Contract: vim_kernels")."""

from __future__ import annotations

import functools

import torch

from .backends import require_triton
from .checks import check_route_shapes, check_scan_shapes
from .reference import multi_route_selective_scan_ref, selective_scan_ref
from .scan_config import ScanConfig, select_config
from .torch_scan import multi_route_selective_scan_torch, selective_scan_torch


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch.compiler.assume_constant_result
def _default_config(batch: int, dim: int, routes: int, length: int, d_state: int, needs_grad: bool, device) -> str:
    # a constant to torch.compile: the launch choice is made once, while tracing, and kept in the graph
    return _encoded_default(batch, dim, routes, length, d_state, needs_grad, torch.device(device))


@functools.lru_cache(maxsize=256)
def _encoded_default(batch, dim, routes, length, d_state, needs_grad, device) -> str:
    return select_config(batch, dim, routes, length, d_state, needs_grad, device).encode()


def _config(config: ScanConfig | None, *shape_and_device) -> str:
    return config.encode() if config is not None else _default_config(*shape_and_device)


def _unknown(backend: str) -> ValueError:
    return ValueError(f"backend must be one of 'ref', 'torch', 'triton'; got {backend!r}")


def selective_scan(
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
    backend: str = "triton",
    config: ScanConfig | None = None,
):
    """Selective scan with mamba_ssm's `selective_scan_fn` semantics (see `selective_scan_ref`).

    u, delta, z: (batch, dim, L), any strides (channel-last views of (batch, L, dim) are the fast path);
    A: (dim, N) float32, negative; B, C: (batch, N, L); D, delta_bias: (dim,) float32.
    Returns out (batch, dim, L) in u's dtype; with return_last_state also the last state (batch, dim, N) float32
    (not differentiable on the triton backend). backend: "ref" (sequential oracle), "torch" (time-major recurrence
    with a hand-written backward, CPU-friendly), "triton" (the `vim::selective_scan_fwd` custom op; config: a
    ScanConfig, default select_config's).
    """
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "torch":
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend != "triton":
        raise _unknown(backend)
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    require_triton(u)
    grad = _needs_grad(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, L = u.shape
    cfg = _config(config, batch, dim, 1, L, A.shape[1], grad, u.device)
    out, last, _ = torch.ops.vim.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state), grad, cfg
    )
    return (out, last) if return_last_state else out


def multi_route_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    routes: torch.Tensor,
    delta_softplus: bool = True,
    backend: str = "triton",
    config: ScanConfig | None = None,
) -> torch.Tensor:
    """R scans over the same L tokens, each visiting them in its own order, merged by mean and gated.

    u, delta: (R, batch, L, dim) in token order; A: (R, dim, N); B, C: (R, batch, L, N); D, delta_bias: (R, dim);
    z: (batch, L, dim) or None; routes: (R, L) int64, routes[r, t] = token visited at step t of route r.
    Returns (batch, L, dim) in token order = mean_r y_r (* silu(z)), where y_r is `selective_scan` (with D skip,
    without gate) of route r's inputs gathered in route order, scattered back to token order.
    The triton backend (`vim::multi_route_scan_fwd`) runs all routes in one launch and reads through the index
    map: no permuted copy is written.
    """
    if backend == "ref":
        return multi_route_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus)
    if backend == "torch":
        return multi_route_selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus)
    if backend != "triton":
        raise _unknown(backend)
    check_route_shapes(u, delta, A, B, C, D, z, delta_bias, routes)
    require_triton(u)
    grad = _needs_grad(u, delta, A, B, C, D, z, delta_bias)
    R, batch, L, dim = u.shape
    cfg = _config(config, batch, dim, R, L, A.shape[2], grad, u.device)
    out, _, _ = torch.ops.vim.multi_route_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, routes, bool(delta_softplus), grad, cfg
    )
    return out


def bidirectional_selective_scan(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool = True, backend: str = "triton"
) -> torch.Tensor:
    """Vim's bidirectional scan: `multi_route_selective_scan` with routes [arange(L), arange(L).flip(0)].

    Same tensors as the multi-route entry with R = 2 (index 0: forward direction, 1: backward direction).
    Equivalent to Vim v2's (y_fwd + flip(y_bwd computed on the flipped inputs)) / 2 * silu(z): the reversed route
    visits the tokens last-to-first and scatters each output back to its token, which is that flip, undone.
    """
    if u.shape[0] != 2:
        raise ValueError(f"bidirectional_selective_scan takes R = 2 routes; got u of shape {tuple(u.shape)}")
    L = u.shape[2]
    fwd = torch.arange(L, device=u.device)
    routes = torch.stack([fwd, fwd.flip(0)])
    return multi_route_selective_scan(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus, backend)


def mamba_inner(
    x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, routes, index32, inverse32,
    save_states: bool = False, config: ScanConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """The interior of a Vim mixer on the triton backend, from in_proj's halves x, z (batch, L, E) to the merged,
    gated output y (batch, L, E), with autograd (`vim::mamba_inner_fwd`, see mixer_ops). Per-route weights stacked
    over routes: conv_w (R, E, K), conv_b (R, E), x_proj_w (R, rank + 2N, E), dt_proj_w (R, E, rank),
    dt_bias (R, E), A_log (R, E, N), D (R, E); routes (R, L) int64 and the same maps as int32 with their inverses.
    save_states keeps the scan's states for the backward (faster, (R, batch, L / chunk, N, E) float32 more memory);
    by default the backward runs the scan again."""
    require_triton(x)
    batch, L, E = x.shape
    R = routes.shape[0]
    grad = _needs_grad(x, z, conv_w, x_proj_w, dt_proj_w, dt_bias, A_log, D)
    cfg = _config(config, batch, E, R, L, A_log.shape[-1], grad, x.device)
    y, _, _, _ = torch.ops.vim.mamba_inner_fwd(
        x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, routes, index32, inverse32,
        bool(save_states) and grad, cfg,
    )  # fmt: skip
    return y


def mamba_mixer_inference(hidden, weights, routes, index32, inverse32, config: ScanConfig | None = None):
    """A Vim mixer's output out_proj(y) for its normed input hidden (batch, L, dim) without gradients, on the
    triton backend (`vim::mamba_mixer_inference`); weights: the mixer's MixerInferenceWeights (pack_mixer_weights),
    routes as for mamba_inner."""
    require_triton(hidden)
    batch, L, _ = hidden.shape
    R, NP, E = weights.A2.shape
    cfg = _config(config, batch, E, R, L, NP, False, hidden.device)
    return torch.ops.vim.mamba_mixer_inference(hidden, *weights, routes, index32, inverse32, cfg)
