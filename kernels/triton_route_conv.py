"""Triton kernels of vim_kernels.route_conv (the route conv's taps gathered through the index maps, fwd + bwd) and its
custom op `vim::route_conv_silu`."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# tokens x channels per program; tiny under the interpreter (each program costs ~1 s there)
BT, BE = (8, 16) if _INTERPRET else (32, 128)


@triton.jit
def _taps(x_ptr, idx_ptr, r_off, b_off, p, re_c, s_x_l, i: tl.constexpr, K: tl.constexpr):
    # x rows feeding tap i of the outputs at route steps p: x[b, index[r, p - (K - 1) + i], :] (0 before the start).
    # Unmasked loads at clamped indices, then a select: a 2-D load mask here trips Triton 3.6's layout pass
    # ("mask type matches ptr type") once E is known to be a multiple of 16. re_c: channels clamped below E.
    s = p - (K - 1) + i
    src = tl.load(idx_ptr + r_off + tl.maximum(s, 0))
    xv = tl.load(x_ptr + b_off + src[:, None] * s_x_l + re_c[None, :]).to(tl.float32)
    return tl.where((s >= 0)[:, None], xv, 0.0)


@triton.jit
def _channels(re, E, EVEN_E: tl.constexpr):
    # channel indices safe to load unmasked, and their mask. EVEN_E (E a multiple of BE, as in every Vim variant):
    # no clamp, so the compiler sees contiguous channels and loads/stores 16 bytes per thread instead of 2
    if EVEN_E:
        return re, tl.full(re.shape, 1, tl.int1)  # a constant mask, folded away
    return tl.minimum(re, E - 1), re < E


@triton.jit
def _tile(L, E, BATCH, BT: tl.constexpr, BE: tl.constexpr, EVEN_E: tl.constexpr):
    # this program's route r, batch b, tokens rt and channels re (grid: token blocks, channel blocks, R * batch),
    # the channel mask and the tile's mask
    pid_t, pid_e, pid_rb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rt = pid_t * BT + tl.arange(0, BT)
    re = pid_e * BE + tl.arange(0, BE)
    _, emask = _channels(re, E, EVEN_E)
    return pid_rb // BATCH, pid_rb % BATCH, rt, re, emask, (rt < L)[:, None] & emask[None, :]


@triton.jit
def _preact(x_ptr, w_ptr, bias_ptr, idx_ptr, inv_ptr, r, b, rt, re, L, E, s_x_b, s_x_l, K: tl.constexpr,
            BT: tl.constexpr, BE: tl.constexpr, EVEN_E: tl.constexpr):  # fmt: skip
    # c = bias + sum_i w_i * tap_i for the (tokens rt, channels re) tile of route r, batch b; also the route steps p
    # of the tokens and the offsets _taps needs again
    tmask = rt < L
    re_c, _ = _channels(re, E, EVEN_E)
    r_off = r.to(tl.int64) * L
    b_off = b.to(tl.int64) * s_x_b
    p = tl.load(inv_ptr + r_off + rt, mask=tmask, other=0)
    c = tl.zeros((BT, BE), tl.float32) + tl.load(bias_ptr + r * E + re_c)[None, :]
    for i in tl.static_range(K):
        xv = _taps(x_ptr, idx_ptr, r_off, b_off, p, re_c, s_x_l, i, K)
        c += xv * tl.load(w_ptr + (r * E + re_c) * K + i)[None, :]
    return c, p, re_c, r_off, b_off


@triton.jit
def _route_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, idx_ptr, inv_ptr, u_ptr, L, E, BATCH, s_x_b, s_x_l,
    K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, EVEN_E: tl.constexpr,
):  # fmt: skip
    r, b, rt, re, _, m2 = _tile(L, E, BATCH, BT, BE, EVEN_E)
    c, _, _, _, _ = _preact(
        x_ptr, w_ptr, bias_ptr, idx_ptr, inv_ptr, r, b, rt, re, L, E, s_x_b, s_x_l, K, BT, BE, EVEN_E
    )
    u = c * tl.sigmoid(c)
    out = u_ptr + ((r.to(tl.int64) * BATCH + b) * L + rt[:, None]) * E + re[None, :]
    tl.store(out, u.to(u_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _route_conv_bwd_dc_kernel(
    x_ptr, w_ptr, bias_ptr, idx_ptr, inv_ptr, du_ptr, dc_ptr, dw_ptr, dbias_ptr, L, E, BATCH, s_x_b, s_x_l,
    K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, EVEN_E: tl.constexpr,
):  # fmt: skip
    # dc = du * silu'(c) in route r's token order (c recomputed from the taps), and this tile's share of
    # dweight[r, :, i] = sum dc * tap_i and dbias[r] = sum dc, added with relaxed atomics
    r, b, rt, re, emask, m2 = _tile(L, E, BATCH, BT, BE, EVEN_E)
    c, p, re_c, r_off, b_off = _preact(
        x_ptr, w_ptr, bias_ptr, idx_ptr, inv_ptr, r, b, rt, re, L, E, s_x_b, s_x_l, K, BT, BE, EVEN_E
    )
    offs = ((r.to(tl.int64) * BATCH + b) * L + rt[:, None]) * E + re[None, :]
    du = tl.load(du_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    sg = tl.sigmoid(c)
    dc = tl.where(m2, du * sg * (1.0 + c * (1.0 - sg)), 0.0)
    tl.store(dc_ptr + offs, dc, mask=m2)
    tl.atomic_add(dbias_ptr + r * E + re, tl.sum(dc, axis=0), mask=emask, sem="relaxed")
    for i in tl.static_range(K):
        xv = _taps(x_ptr, idx_ptr, r_off, b_off, p, re_c, s_x_l, i, K)
        tl.atomic_add(dw_ptr + (r * E + re) * K + i, tl.sum(dc * xv, axis=0), mask=emask, sem="relaxed")


@triton.jit
def _route_conv_bwd_dx_kernel(
    dc_ptr, w_ptr, idx_ptr, inv_ptr, dx_ptr, L, E, BATCH, s_dx_b, s_dx_l,
    R: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, EVEN_E: tl.constexpr,
):  # fmt: skip
    # token t at step q of route r fed tap i of the output at step q + (K - 1) - i: dx sums those over r and i
    pid_t, pid_e, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rt = pid_t * BT + tl.arange(0, BT)
    re = pid_e * BE + tl.arange(0, BE)
    tmask = rt < L
    re_c, emask = _channels(re, E, EVEN_E)
    dx = tl.zeros((BT, BE), tl.float32)
    for r in tl.static_range(R):
        q = tl.load(inv_ptr + r * L + rt, mask=tmask, other=0)
        for i in tl.static_range(K):
            s = q + (K - 1) - i
            tok = tl.load(idx_ptr + r * L + tl.minimum(s, L - 1))  # clamped + select: see _taps
            offs = ((r * BATCH + b.to(tl.int64)) * L + tok[:, None]) * E + re_c[None, :]
            dcv = tl.where((tmask & (s < L))[:, None], tl.load(dc_ptr + offs), 0.0)
            dx += dcv * tl.load(w_ptr + (r * E + re_c) * K + i)[None, :]
    out = dx_ptr + b.to(tl.int64) * s_dx_b + rt[:, None] * s_dx_l + re[None, :]
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=tmask[:, None] & emask[None, :])


def route_conv_fwd(x, w, b, index, inverse) -> torch.Tensor:
    """u = silu(route conv of x) for every route: x (batch, L, E) (read in place when its channels are contiguous);
    w (R, E, K), b (R, E)
    float32; index, inverse (R, L) int32. Returns (R, batch, L, E) in x's dtype."""
    w, b, index, inverse = w.contiguous(), b.contiguous(), index.contiguous(), inverse.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, L, E = x.shape
    R, _, K = w.shape
    u = torch.empty((R, batch, L, E), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(L, BT), triton.cdiv(E, BE), R * batch)
    _route_conv_fwd_kernel[grid](
        x, w, b, index, inverse, u, L, E, batch, x.stride(0), x.stride(1), K=K, BT=BT, BE=BE,
        EVEN_E=E % BE == 0, num_warps=4,
    )  # fmt: skip
    return u


def route_conv_bwd(du, x, w, b, index, inverse):
    """Gradients of route_conv_fwd for the output gradient du (R, batch, L, E): (dx like x, dw, db float32)."""
    w, b, index, inverse = w.contiguous(), b.contiguous(), index.contiguous(), inverse.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, L, E = x.shape
    R, _, K = w.shape
    du = du.contiguous()
    dc = torch.empty((R, batch, L, E), device=x.device, dtype=torch.float32)
    dw = torch.zeros_like(w)
    db = torch.zeros_like(b)
    grid = (triton.cdiv(L, BT), triton.cdiv(E, BE), R * batch)
    _route_conv_bwd_dc_kernel[grid](
        x, w, b, index, inverse, du, dc, dw, db, L, E, batch, x.stride(0), x.stride(1),
        K=K, BT=BT, BE=BE, EVEN_E=E % BE == 0, num_warps=4,
    )  # fmt: skip
    dx = torch.empty((batch, L, E), device=x.device, dtype=x.dtype)
    _route_conv_bwd_dx_kernel[(triton.cdiv(L, BT), triton.cdiv(E, BE), batch)](
        dc, w, index, inverse, dx, L, E, batch, dx.stride(0), dx.stride(1), R=R, K=K, BT=BT, BE=BE,
        EVEN_E=E % BE == 0, num_warps=4,
    )  # fmt: skip
    return dx, dw, db


@torch.library.custom_op("vim::route_conv_silu", mutates_args=())
def route_conv_silu(x: Tensor, weight: Tensor, bias: Tensor, index32: Tensor, inverse32: Tensor) -> Tensor:
    """route_conv_fwd as a custom op (autograd below): x (batch, L, E) with unit channel stride; weight (R, E, K);
    bias (R, E); index32, inverse32 (R, L) int32 contiguous."""
    return route_conv_fwd(x, weight.float().contiguous(), bias.float().contiguous(), index32, inverse32)


@route_conv_silu.register_fake
def _(x, weight, bias, index32, inverse32):
    return x.new_empty((weight.shape[0], *x.shape))


@torch.library.custom_op("vim::route_conv_silu_bwd", mutates_args=())
def route_conv_silu_bwd(
    du: Tensor, x: Tensor, weight: Tensor, bias: Tensor, index32: Tensor, inverse32: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = route_conv_bwd(du, x, weight.float().contiguous(), bias.float().contiguous(), index32, inverse32)
    return dx, dw.to(weight.dtype), db.to(bias.dtype)


@route_conv_silu_bwd.register_fake
def _(du, x, weight, bias, index32, inverse32):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _route_conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _route_conv_backward(ctx, du):
    dx, dw, db = route_conv_silu_bwd(du, *ctx.saved_tensors)
    return dx, dw, db, None, None


route_conv_silu.register_autograd(_route_conv_backward, setup_context=_route_conv_setup)
