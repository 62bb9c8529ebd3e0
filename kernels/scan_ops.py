"""The Triton selective scans as PyTorch custom ops (torch.library), with autograd and fake kernels.

`vim::selective_scan_fwd` / `_bwd` (one route, mamba_ssm's layout) and `vim::multi_route_scan_fwd` / `_bwd`
(R routes over the same tokens, merged by their mean and gated). Being custom ops, torch.compile traces through
them without a graph break (the fake kernels give it the output shapes) and AOTAutograd takes their backward from
the registered autograd formula; eagerly they run as before. The config string is ScanConfig.encode(): a
launch choice, part of the op's arguments so a compiled graph keeps the choice it was traced with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scan_config import ScanConfig, next_pow2
from .scan_launch import empty, empty_like, launch_bwd, launch_fwd, pack_A, pack_rows, split_grads, unpack_dBC
from .scan_merge import merge_routes, merge_routes_backward


def _absent(like: Tensor) -> Tensor:
    """The stand-in output for an absent gradient or saved tensor (custom ops return tensors only)."""
    return like.new_empty(0)


def _f32(t: Tensor | None) -> Tensor | None:
    return t.float().contiguous() if t is not None else None


def _as4(x: Tensor) -> Tensor:
    """(batch, dim, L) -> a (1, batch, L, dim) view (no copy): the kernels index (route, batch, time, channel)."""
    return x.transpose(1, 2).unsqueeze(0)


# ---- one route ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("vim::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, return_last_state: bool, save_states: bool, config: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """u, delta, z (batch, dim, L), any strides; A (dim, N); B, C (batch, N, L). Returns (out like u, last state
    (batch, dim, N) float32 or empty, saved states or empty)."""
    cfg = ScanConfig.decode(config)
    batch, dim, L = u.shape
    N = A.shape[1]
    A2, BC = pack_A(A.float().unsqueeze(0)), pack_rows(_as4(B), _as4(C))
    out = empty_like(u)  # keeps u's memory layout (channel-last in, channel-last out)
    hs, last = launch_fwd(
        _as4(u), _as4(delta), A2, BC, _f32(D), _f32(delta_bias), z.transpose(1, 2) if z is not None else None,
        _as4(out), None, softplus, False, return_last_state, save_states, cfg,
    )  # fmt: skip
    last = last[:, :N].transpose(1, 2).contiguous() if last is not None else _absent(A)
    return out, last, hs if hs is not None else _absent(A)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, softplus, return_last_state, save_states, config):
    cfg = ScanConfig.decode(config)
    batch, dim, L = u.shape
    N = A.shape[1]
    last = A.new_empty((batch, dim, N), dtype=torch.float32) if return_last_state else A.new_empty(0)
    states = (1, batch, -(-L // cfg.chunk), next_pow2(N), dim)
    return torch.empty_like(u), last, A.new_empty(states, dtype=torch.float32) if save_states else A.new_empty(0)


@torch.library.custom_op("vim::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, hs: Tensor, softplus: bool, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(du, ddelta, dz or empty, the kernels' summed float32 gradients (scan_launch.split_grads)) of
    selective_scan_fwd from its saved states."""
    A2, BC = pack_A(A.float().unsqueeze(0)), pack_rows(_as4(B), _as4(C))
    du, ddelta = empty_like(u), empty_like(delta)
    dz = empty_like(z) if z is not None else None
    flat = launch_bwd(
        _as4(u), _as4(delta), A2, BC, _f32(D), _f32(delta_bias), z.transpose(1, 2) if z is not None else None,
        _as4(dout), hs, None, _as4(du), _as4(ddelta), dz.transpose(1, 2) if dz is not None else None, softplus,
        ScanConfig.decode(config),
    )  # fmt: skip
    return du, ddelta, dz if dz is not None else _absent(A), flat


@selective_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, hs, softplus, config):
    batch, dim, L = u.shape
    NP = next_pow2(A.shape[1])
    flat = A.new_empty(batch * L * 2 * NP + NP * dim + 2 * dim, dtype=torch.float32)
    return torch.empty_like(u), torch.empty_like(delta), torch.empty_like(z) if z is not None else A.new_empty(0), flat


def _selective_scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, _, _, config = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.softplus, ctx.config = softplus, config
    ctx.mark_non_differentiable(output[1], output[2])


def _selective_scan_backward(ctx, dout, *_):
    u, delta, A, B, C, D, z, delta_bias, hs = ctx.saved_tensors
    du, ddelta, dz, flat = selective_scan_bwd(
        dout.contiguous(), u, delta, A, B, C, D, z, delta_bias, hs, ctx.softplus, ctx.config
    )
    (batch, dim, L), N = u.shape, A.shape[1]
    dA, dBC, dD, ddb = split_grads(flat, 1, batch, L, next_pow2(N), dim)
    dB, dC = unpack_dBC(dBC[0], N, B.dtype, C.dtype)
    return (
        du, ddelta, dA[0, :N].t().to(A.dtype), dB.transpose(1, 2), dC.transpose(1, 2),
        dD[0].to(D.dtype) if D is not None else None, dz if z is not None else None,
        ddb[0].to(delta_bias.dtype) if delta_bias is not None else None, None, None, None, None,
    )  # fmt: skip


selective_scan_fwd.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup)


# ---- R routes, merged --------------------------------------------------------------------------------------------
def multi_route_forward(u, delta, A2, BC, D, delta_bias, z, routes, softplus, save_states, cfg, wdt=None, out=None,
                        merge=True):  # fmt: skip
    """Every route's scan added into one float32 (batch, L, dim) buffer, then (merge) the mean over the routes gated
    by silu(z) into `out` (default: a new tensor of u's dtype). Returns (out or None, saved states or None, the
    sum)."""
    R, batch, L, dim = u.shape
    acc = torch.zeros((batch, L, dim), device=u.device, dtype=torch.float32)
    hs, _ = launch_fwd(
        u, delta, A2, BC, D, delta_bias, None, acc.unsqueeze(0).expand(R, batch, L, dim), routes, softplus, True,
        False, save_states, cfg, wdt=wdt,
    )  # fmt: skip
    if not merge:
        return None, hs, acc
    if out is None:
        out = empty((batch, L, dim), u.device, u.dtype)
    return merge_routes(acc, z, out, R), hs, acc


def multi_route_backward(dout, u, delta, A2, BC, D, delta_bias, z, routes, hs, acc, softplus, cfg):
    """The merge's and every route's backward: (du, ddelta, dz or None, the kernels' summed float32 gradients
    (scan_launch.split_grads))."""
    R, batch, L, dim = u.shape
    dy = empty((batch, L, dim), u.device, torch.float32)
    dz = empty((batch, L, dim), u.device, z.dtype) if z is not None else None
    merge_routes_backward(acc, z, dout.contiguous(), R, dy, dz)
    du, ddelta = empty_like(u), empty_like(delta)
    flat = launch_bwd(
        u, delta, A2, BC, D, delta_bias, None, dy.unsqueeze(0).expand(R, batch, L, dim), hs, routes, du, ddelta,
        None, softplus, cfg,
    )  # fmt: skip
    return du, ddelta, dz, flat


@torch.library.custom_op("vim::multi_route_scan_fwd", mutates_args=())
def multi_route_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, routes: Tensor, softplus: bool, save_states: bool, config: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """u, delta (R, batch, L, dim) in token order; A (R, dim, N); B, C (R, batch, L, N); routes (R, L). Returns
    (out (batch, L, dim) in u's dtype, saved states or empty, the float32 sum of the routes or empty)."""
    cfg = ScanConfig.decode(config)
    out, hs, acc = multi_route_forward(
        u, delta, pack_A(A.float()), pack_rows(B, C), _f32(D), _f32(delta_bias), z, routes.contiguous(), softplus,
        save_states, cfg,
    )  # fmt: skip
    if not save_states:
        return out, _absent(A), _absent(A)
    return out, hs, acc


@multi_route_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, routes, softplus, save_states, config):
    cfg = ScanConfig.decode(config)
    R, batch, L, dim = u.shape
    out = u.new_empty((batch, L, dim))
    if not save_states:
        return out, A.new_empty(0), A.new_empty(0)
    states = A.new_empty((R, batch, -(-L // cfg.chunk), next_pow2(A.shape[2]), dim), dtype=torch.float32)
    return out, states, A.new_empty((batch, L, dim), dtype=torch.float32)


@torch.library.custom_op("vim::multi_route_scan_bwd", mutates_args=())
def multi_route_scan_bwd(
    dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, routes: Tensor, hs: Tensor, acc: Tensor, softplus: bool, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(du, ddelta, dz or empty, the kernels' summed float32 gradients) of multi_route_scan_fwd."""
    du, ddelta, dz, flat = multi_route_backward(
        dout, u, delta, pack_A(A.float()), pack_rows(B, C), _f32(D), _f32(delta_bias), z, routes.contiguous(), hs,
        acc, softplus, ScanConfig.decode(config),
    )  # fmt: skip
    return du, ddelta, dz if dz is not None else _absent(A), flat


@multi_route_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, routes, hs, acc, softplus, config):
    R, batch, L, dim = u.shape
    NP = next_pow2(A.shape[2])
    flat = A.new_empty(R * batch * L * 2 * NP + R * NP * dim + 2 * R * dim, dtype=torch.float32)
    dz = z.new_empty(z.shape) if z is not None else A.new_empty(0)
    return torch.empty_like(u), torch.empty_like(delta), dz, flat


def _multi_route_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, routes, softplus, _, config = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, routes, output[1], output[2])
    ctx.softplus, ctx.config = softplus, config
    ctx.mark_non_differentiable(output[1], output[2])


def _multi_route_backward(ctx, dout, *_):
    u, delta, A, B, C, D, z, delta_bias, routes, hs, acc = ctx.saved_tensors
    du, ddelta, dz, flat = multi_route_scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, routes, hs, acc, ctx.softplus, ctx.config
    )
    (R, batch, L, dim), N = u.shape, A.shape[2]
    dA, dBC, dD, ddb = split_grads(flat, R, batch, L, next_pow2(N), dim)
    dB, dC = unpack_dBC(dBC, N, B.dtype, C.dtype)
    return (
        du, ddelta, dA[:, :N].transpose(1, 2).to(A.dtype), dB, dC, dD.to(D.dtype) if D is not None else None,
        dz if z is not None else None, ddb.to(delta_bias.dtype) if delta_bias is not None else None,
        None, None, None, None,
    )  # fmt: skip


multi_route_scan_fwd.register_autograd(_multi_route_backward, setup_context=_multi_route_setup)
