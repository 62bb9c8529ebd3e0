"""The interior of a Vim (multi-route Mamba) mixer as fused Triton custom ops: one for training, one for inference.

Both span what lies between in_proj's two halves x, z and the gated, merged output y (the inference op also runs
in_proj and out_proj): every route's depthwise conv + SiLU along its route, x_proj, dt_proj, the selective scan,
the mean over routes and the silu(z) gate.

- `vim::mamba_inner_fwd` / `_bwd` (training): like mamba_ssm's mamba_inner_fn, the forward keeps only what is small
  or already alive (x, z, x_proj's output); the backward recomputes the conv, delta and, unless `save_states`, the
  scan's states, so a block holds no (R, batch, L, E) activation between its forward and its backward.
- `vim::mamba_mixer_inference` (no gradients): owns the packed operand layout end to end. x_proj's weight is
  stored reordered as the scan's operand rows [B | C | dt_low] (pack_mixer_weights), so its output is what the
  scan reads; up to a dt rank of ScanConfig.dt_proj_max_rank the scan forms delta = dt_proj @ dt_low per step in
  registers (no delta tensor); the gated output is written over z.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan_config import ScanConfig, next_pow2
from .scan_launch import pack_A, pack_dt_proj, pack_rows, packed_projection_weight, split_grads, unpack_dBC
from .scan_ops import multi_route_backward, multi_route_forward
from .triton_route_conv import route_conv_bwd, route_conv_fwd


def per_route_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (R, batch, L, K) @ weight (R, M, K)^T -> (R, batch, L, M): one batched GEMM over the routes (the batch and
    token axes folded into rows, no copy of x or of the weight)."""
    R, batch, L, K = x.shape
    return torch.bmm(x.reshape(R, batch * L, K), weight.transpose(1, 2)).view(R, batch, L, weight.shape[1])


def per_route_weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """The weight gradient of per_route_linear: sum over batch and tokens of dy^T x -> (R, M, K)."""
    R, batch, L, M = dy.shape
    return torch.bmm(dy.reshape(R, batch * L, M).transpose(1, 2), x.reshape(R, batch * L, x.shape[-1]))


def _absent(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---- training ----------------------------------------------------------------------------------------------------
def _recompute(x, conv_w, conv_b, x_dbl, dt_proj_w, A_log, index32, inverse32, rank: int):
    """What the forward computed and the backward needs again: u, dt_low, B, C, delta, A, A2 and the packed rows."""
    u = route_conv_fwd(x, conv_w.float().contiguous(), conv_b.float().contiguous(), index32, inverse32)
    N = A_log.shape[-1]
    dt_low, B, C = torch.split(x_dbl, [rank, N, N], dim=-1)
    delta = per_route_linear(dt_low, dt_proj_w.to(x.dtype))
    A = -torch.exp(A_log.float())
    return u, dt_low, B, C, delta, A, pack_A(A), pack_rows(B, C)


@torch.library.custom_op("vim::mamba_inner_fwd", mutates_args=())
def mamba_inner_fwd(
    x: Tensor, z: Tensor, conv_w: Tensor, conv_b: Tensor, x_proj_w: Tensor, dt_proj_w: Tensor, dt_bias: Tensor,
    A_log: Tensor, D: Tensor, routes: Tensor, index32: Tensor, inverse32: Tensor, save_states: bool, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """x, z (batch, L, E) (halves of in_proj's output: unit channel stride); per route r: conv_w (R, E, K),
    conv_b (R, E), x_proj_w (R, rank + 2N, E), dt_proj_w (R, E, rank), dt_bias (R, E), A_log (R, E, N), D (R, E);
    routes (R, L) int64, index32 / inverse32 the same maps as int32. Returns (y (batch, L, E) in x's dtype,
    x_proj's output (R, batch, L, rank + 2N), and with save_states the scan's states and route sum)."""
    cfg = ScanConfig.decode(config)
    u = route_conv_fwd(x, conv_w.float().contiguous(), conv_b.float().contiguous(), index32, inverse32)
    x_dbl = per_route_linear(u, x_proj_w.to(x.dtype))
    rank, N = dt_proj_w.shape[-1], A_log.shape[-1]
    dt_low, B, C = torch.split(x_dbl, [rank, N, N], dim=-1)
    delta = per_route_linear(dt_low, dt_proj_w.to(x.dtype))
    y, hs, acc = multi_route_forward(
        u, delta, pack_A(-torch.exp(A_log.float())), pack_rows(B, C), D.float().contiguous(),
        dt_bias.float().contiguous(), z, routes, True, save_states, cfg,
    )  # fmt: skip
    if not save_states:
        return y, x_dbl, _absent(A_log), _absent(A_log)
    return y, x_dbl, hs, acc


@mamba_inner_fwd.register_fake
def _(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, routes, index32, inverse32, save_states, config):
    cfg = ScanConfig.decode(config)
    batch, L, E = x.shape
    R, N = A_log.shape[0], A_log.shape[-1]
    y = x.new_empty((batch, L, E))
    x_dbl = x.new_empty((R, batch, L, x_proj_w.shape[1]))
    if not save_states:
        return y, x_dbl, A_log.new_empty(0), A_log.new_empty(0)
    hs = A_log.new_empty((R, batch, -(-L // cfg.chunk), next_pow2(N), E), dtype=torch.float32)
    return y, x_dbl, hs, A_log.new_empty((batch, L, E), dtype=torch.float32)


@torch.library.custom_op("vim::mamba_inner_bwd", mutates_args=())
def mamba_inner_bwd(
    dy: Tensor, x: Tensor, z: Tensor, conv_w: Tensor, conv_b: Tensor, x_proj_w: Tensor, dt_proj_w: Tensor,
    dt_bias: Tensor, A_log: Tensor, D: Tensor, routes: Tensor, index32: Tensor, inverse32: Tensor, x_dbl: Tensor,
    hs: Tensor, acc: Tensor, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (dx, dz, dconv_w, dconv_b, dx_proj_w, ddt_proj_w, ddt_bias, dA_log, dD) of mamba_inner_fwd."""
    cfg = ScanConfig.decode(config)
    dtype, rank, N = x.dtype, dt_proj_w.shape[-1], A_log.shape[-1]
    w32, b32 = conv_w.float().contiguous(), conv_b.float().contiguous()
    u, dt_low, B, C, delta, A, A2, BC = _recompute(x, conv_w, conv_b, x_dbl, dt_proj_w, A_log, index32, inverse32, rank)
    D32, db32 = D.float().contiguous(), dt_bias.float().contiguous()
    if hs.numel() == 0:  # the forward kept nothing of the scan: run it again, keeping its states and route sum
        _, hs, acc = multi_route_forward(u, delta, A2, BC, D32, db32, None, routes, True, True, cfg, merge=False)
    du, ddelta, dz, flat = multi_route_backward(dy, u, delta, A2, BC, D32, db32, z, routes, hs, acc, True, cfg)
    del hs, acc, delta
    R, batch, L, E = u.shape
    dA, dBC, dD, ddb = split_grads(flat, R, batch, L, A2.shape[1], E)
    dB, dC = unpack_dBC(dBC, N, dtype, dtype)
    w_dt = dt_proj_w.to(dtype)
    ddt_low = per_route_linear(ddelta, w_dt.transpose(1, 2))
    ddt_proj_w = per_route_weight_grad(ddelta, dt_low)
    dx_dbl = torch.cat((ddt_low, dB, dC), dim=-1)
    du += per_route_linear(dx_dbl, x_proj_w.to(dtype).transpose(1, 2))
    dx_proj_w = per_route_weight_grad(dx_dbl, u)
    dx, dconv_w, dconv_b = route_conv_bwd(du, x, w32, b32, index32, inverse32)
    dA_log = dA[:, :N].transpose(1, 2) * A  # A = -exp(A_log)
    return (
        dx, dz, dconv_w.to(conv_w.dtype), dconv_b.to(conv_b.dtype), dx_proj_w.to(x_proj_w.dtype),
        ddt_proj_w.to(dt_proj_w.dtype), ddb.to(dt_bias.dtype, copy=True), dA_log.to(A_log.dtype),
        dD.to(D.dtype, copy=True),
    )  # fmt: skip


@mamba_inner_bwd.register_fake
def _(dy, x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, routes, index32, inverse32, x_dbl, hs, acc,
      config):  # fmt: skip
    like = torch.empty_like
    return (x.new_empty(x.shape), z.new_empty(z.shape), like(conv_w), like(conv_b), like(x_proj_w), like(dt_proj_w),
            like(dt_bias), like(A_log), like(D))  # fmt: skip


def _mamba_inner_setup(ctx, inputs, output):
    *tensors, save_states, config = inputs
    _, x_dbl, hs, acc = output
    ctx.save_for_backward(*tensors, x_dbl, hs, acc)
    ctx.config = config
    ctx.mark_non_differentiable(x_dbl, hs, acc)


def _mamba_inner_backward(ctx, dy, *_):
    grads = mamba_inner_bwd(dy.contiguous(), *ctx.saved_tensors, ctx.config)
    return (*grads, None, None, None, None, None)


mamba_inner_fwd.register_autograd(_mamba_inner_backward, setup_context=_mamba_inner_setup)


# ---- inference ---------------------------------------------------------------------------------------------------
class MixerInferenceWeights(NamedTuple):
    """A mixer's weights in the inference op's layouts; pack_mixer_weights makes them (cache them per weight version:
    they change only when the weights do)."""

    in_proj: Tensor  # (2E, dim) compute dtype
    conv_w: Tensor  # (R, E, K) float32
    conv_b: Tensor  # (R, E) float32
    x_proj_rows: Tensor  # (R, 2 NP + P, E) compute dtype: x_proj's rows as [B | C | dt_low], zero-padded
    dt_proj: Tensor  # (R, E, rank) compute dtype: delta by a GEMM
    dt_proj_tile: Tensor  # (R, P, E) float32: delta formed in the scan
    dt_bias: Tensor  # (R, E) float32
    A2: Tensor  # (R, NP, E) float32, A = -exp(A_log) times log2(e)
    D: Tensor  # (R, E) float32
    out_proj: Tensor  # (dim, E) compute dtype


def pack_mixer_weights(in_proj, conv_w, conv_b, x_proj, dt_proj, dt_bias, A_log, D, out_proj, dtype):
    """The weights of one mixer, stacked over routes as mamba_inner_fwd takes them, in the inference op's layouts
    for activations of `dtype`."""
    rank, N = dt_proj.shape[-1], A_log.shape[-1]
    with torch.no_grad():
        return MixerInferenceWeights(
            in_proj.to(dtype).contiguous(), conv_w.float().contiguous(), conv_b.float().contiguous(),
            packed_projection_weight(x_proj.to(dtype), N, rank), dt_proj.to(dtype).contiguous(),
            pack_dt_proj(dt_proj.float()), dt_bias.float().contiguous(), pack_A(-torch.exp(A_log.float())),
            D.float().contiguous(), out_proj.to(dtype).contiguous(),
        )  # fmt: skip


@torch.library.custom_op("vim::mamba_mixer_inference", mutates_args=())
def mamba_mixer_inference(
    hidden: Tensor, in_proj: Tensor, conv_w: Tensor, conv_b: Tensor, x_proj_rows: Tensor, dt_proj: Tensor,
    dt_proj_tile: Tensor, dt_bias: Tensor, A2: Tensor, D: Tensor, out_proj: Tensor, routes: Tensor, index32: Tensor,
    inverse32: Tensor, config: str,
) -> Tensor:  # fmt: skip
    """The mixer's output out_proj(y) for normed input hidden (batch, L, dim), without gradients; the weights as
    MixerInferenceWeights, the routes as for mamba_inner_fwd. Ordered for peak memory: x is dropped once the convs
    have read it, z is formed last and the gated output is written over it."""
    cfg = ScanConfig.decode(config)
    R, NP, E = A2.shape
    rank = dt_proj.shape[-1]
    u = route_conv_fwd(F.linear(hidden, in_proj[:E]), conv_w, conv_b, index32, inverse32)
    if rank <= cfg.dt_proj_max_rank:  # delta formed in the scan from the rows' dt_low
        rows, delta, wdt = per_route_linear(u, x_proj_rows), u, dt_proj_tile
    else:
        rows = per_route_linear(u, x_proj_rows[:, : 2 * NP])
        delta, wdt = per_route_linear(per_route_linear(u, x_proj_rows[:, 2 * NP : 2 * NP + rank]), dt_proj), None
    z = F.linear(hidden, in_proj[E:])
    y, _, _ = multi_route_forward(u, delta, A2, rows, D, dt_bias, z, routes, True, False, cfg, wdt=wdt, out=z)
    return F.linear(y, out_proj)


@mamba_mixer_inference.register_fake
def _(hidden, in_proj, conv_w, conv_b, x_proj_rows, dt_proj, dt_proj_tile, dt_bias, A2, D, out_proj, routes, index32,
      inverse32, config):  # fmt: skip
    return hidden.new_empty((*hidden.shape[:-1], out_proj.shape[0]))
