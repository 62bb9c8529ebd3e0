"""Fast pure-PyTorch selective scan for CPUs: a time-major sequential scan with a hand-written backward.

Layout: every tensor of the core is time-major, (L, R, batch, dim[, N]), so the one sequential part -- the state
recurrence h_t = a_t h_{t-1} + b_t forward and dh_t = g_t + a_{t+1} dh_{t+1} backward -- walks contiguous
slabs with one in-place op per step. Everything else (decays, outputs, all the gradient reductions) is done in
bulk after the loop. Only decays exp(delta * A) with delta >= 0 (after softplus) and A < 0 are formed, so large
delta*|A| underflows to 0 and never overflows.

Memory: the (L, R, batch, N, dim) tensors live in per-thread scratch buffers of at most `BLOCK_BYTES`, reused for
each block of the batch; the backward recomputes the states from the (small) saved inputs.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_route_shapes, check_scan_shapes

# largest (L, R, batch-block, N, dim) float32 buffer; the batch is split into blocks that fit it. The buffers are
# kept per thread and reused across blocks and calls: allocating fresh large tensors (page faults) costs more on
# CPU than the arithmetic done in them.
BLOCK_BYTES = 16 << 20
_WS = threading.local()


def _buffers(shape, n, device):
    """n float32 scratch tensors of `shape` on `device`, views of per-thread, per-device storage reused across calls."""
    numel = math.prod(shape)
    per_device = getattr(_WS, "bufs", None)
    if per_device is None:
        per_device = _WS.bufs = {}
    bufs = per_device.get(device)
    if bufs is None or bufs[0].numel() < numel or len(bufs) < n:
        size = max(numel, bufs[0].numel() if bufs else 0)
        # normal tensors even when first asked for under inference_mode (validation): they outlive the call
        with torch.inference_mode(False):
            bufs = per_device[device] = [torch.empty(size, device=device) for _ in range(max(n, len(bufs or ())))]
    return [b[:numel].view(shape) for b in bufs[:n]]


def _blocks(L: int, R: int, batch: int, dim: int, N: int) -> list[tuple[int, int]]:
    per_item = max(1, L * R * dim * N * 4)
    bb = max(1, min(batch, BLOCK_BYTES // per_item))
    return [(s, min(batch, s + bb)) for s in range(0, batch, bb)]


def _states(a, h, dt, dtu, A, B):
    """Fill a = exp(dt A) and the states h, (L, R, b, N, dim), of one batch block; dt, dtu: (L, R, b, dim)."""
    torch.mul(dt.unsqueeze(-2), A.unsqueeze(1), out=a).exp_()  # A: (R, N, dim) -> (R, 1, N, dim)
    torch.mul(dtu.unsqueeze(-2), B.unsqueeze(-1), out=h)  # b_t = dt u B, overwritten in place by h_t
    for t in range(1, h.shape[0]):
        h[t].addcmul_(a[t], h[t - 1])


def _delta(delta, delta_bias, softplus):
    x = delta if delta_bias is None else delta + delta_bias.unsqueeze(1)
    return x, (F.softplus(x) if softplus else x)


@torch.library.custom_op("vim::scan_tm_fwd", mutates_args=())
def scan_tm_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, delta_bias: Tensor | None,
    softplus: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The core on float32 time-major tensors. u, delta: (L, R, b, dim); A: (R, N, dim); B, C: (L, R, b, N);
    D, delta_bias: (R, dim) or None. Returns y (L, R, b, dim) (with the D skip) and the last state (R, b, N, dim).
    A custom op: torch.compile keeps it whole (no loop over L unrolled into the graph)."""
    L, R, batch, dim = u.shape
    N = A.shape[-2]
    _, dt = _delta(delta, delta_bias, softplus)
    dtu = dt * u
    y = torch.empty_like(u)
    last = u.new_empty(R, batch, N, dim)
    for s, e in _blocks(L, R, batch, dim, N):
        a, h = _buffers((L, R, e - s, N, dim), 2, u.device)
        _states(a, h, dt[:, :, s:e], dtu[:, :, s:e], A, B[:, :, s:e])
        # y_t = <C_t, h_t>: one batched (1, N) x (N, dim) product over all (t, r, b)
        y[:, :, s:e] = torch.matmul(C[:, :, s:e].unsqueeze(-2), h).squeeze(-2)
        last[:, s:e] = h[-1]
    if D is not None:
        y.addcmul_(u, D.unsqueeze(1))
    return y, last


@scan_tm_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, softplus):
    L, R, batch, dim = u.shape
    return torch.empty_like(u), u.new_empty(R, batch, A.shape[-2], dim)


@torch.library.custom_op("vim::scan_tm_bwd", mutates_args=())
def scan_tm_bwd(
    dy: Tensor, dlast: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
    delta_bias: Tensor | None, softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of scan_tm_fwd, the states recomputed from its inputs
    (nothing of size N * dim per token was kept); empty for an absent D or delta_bias."""
    L, R, batch, dim = u.shape
    x, dt = _delta(delta, delta_bias, softplus)
    dtu = dt * u
    du = torch.empty_like(u)
    ddt = torch.empty_like(u)
    dB = torch.empty_like(B)
    dC = torch.empty_like(C)
    dA = torch.zeros_like(A)
    N = A.shape[-2]
    for s, e in _blocks(L, R, batch, dim, N):
        dts, dtus, Bs, Cs, dys = dt[:, :, s:e], dtu[:, :, s:e], B[:, :, s:e], C[:, :, s:e], dy[:, :, s:e]
        a, h, g = _buffers((L, R, e - s, N, dim), 3, u.device)
        _states(a, h, dts, dtus, A, Bs)
        # g_t = dL/dh_t: C_t dy_t plus what flows back from h_{t+1} = a_{t+1} h_t + ...
        torch.mul(dys.unsqueeze(-2), Cs.unsqueeze(-1), out=g)
        if dlast is not None:
            g[-1].add_(dlast[:, s:e])
        for t in range(L - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        # dC_t = sum_dim h_t dy_t
        dC[:, :, s:e] = torch.matmul(h, dys.unsqueeze(-1)).squeeze(-1)
        # b_t = dt u B: db_t = g_t
        gB = torch.matmul(Bs.unsqueeze(-2), g).squeeze(-2)  # (L, R, b, dim)
        dB[:, :, s:e] = torch.matmul(g, dtus.unsqueeze(-1)).squeeze(-1)
        torch.mul(gB, dts, out=du[:, :, s:e])
        torch.mul(gB, u[:, :, s:e], out=ddt[:, :, s:e])
        if L > 1:
            # a_t = exp(dt_t A): d(dt A)_t = g_t h_{t-1} a_t (t >= 1; h_{-1} = 0)
            da = a[1:].mul_(h[:-1]).mul_(g[1:])  # in a's buffer
            gw = g[1:]  # g is no longer needed: scratch
            torch.mul(da, dts[1:].unsqueeze(-2), out=gw)
            dA += gw.sum(0).sum(1)
            torch.mul(da, A.unsqueeze(1), out=gw)
            ddt[1:, :, s:e] += gw.sum(-2)
    if D is not None:
        du.addcmul_(dy, D.unsqueeze(1))
        dD = torch.mul(dy, u).sum((0, 2))
    else:
        dD = u.new_empty(0)
    if softplus:
        ddt.mul_(torch.sigmoid(x))  # softplus' (torch's threshold 20: sigmoid(x > 20) is 1 in float32)
    ddb = ddt.sum((0, 2)) if delta_bias is not None else u.new_empty(0)
    return du, ddt, dA, dB, dC, dD, ddb


@scan_tm_bwd.register_fake
def _(dy, dlast, u, delta, A, B, C, D, delta_bias, softplus):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty(0)

    return like(u), like(u), like(A), like(B), like(C), like(D), like(delta_bias)


def _scan_tm_setup(ctx, inputs, output):
    *tensors, softplus = inputs
    ctx.save_for_backward(*tensors)
    ctx.softplus = softplus


def _scan_tm_backward(ctx, dy, dlast):
    u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    du, ddt, dA, dB, dC, dD, ddb = scan_tm_bwd(dy.contiguous(), dlast, u, delta, A, B, C, D, delta_bias, ctx.softplus)
    return du, ddt, dA, dB, dC, dD if D is not None else None, ddb if delta_bias is not None else None, None


scan_tm_fwd.register_autograd(_scan_tm_backward, setup_context=_scan_tm_setup)


def _scan_tm(u, delta, A, B, C, D, delta_bias, softplus):
    """float32 time-major core with autograd (see `scan_tm_fwd`)."""
    f = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    y, last = scan_tm_fwd(
        u.float().contiguous(),
        delta.float().contiguous(),
        A.float().transpose(-1, -2).contiguous(),
        B.float().contiguous(),
        C.float().contiguous(),
        f(D),
        f(delta_bias),
        bool(softplus),
    )
    return y, last.transpose(-1, -2)


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Same function and signature as `selective_scan_ref` (u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, N, L); D, delta_bias (dim,)), computed by the time-major scan of `scan_tm_fwd`."""
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    # (batch, dim, L) -> time-major (L, 1, batch, dim): one route
    tm = lambda t: t.permute(2, 0, 1).unsqueeze(1)  # noqa: E731
    y, last = _scan_tm(
        tm(u),
        tm(delta),
        A.unsqueeze(0),
        tm(B),
        tm(C),
        None if D is None else D.unsqueeze(0),
        None if delta_bias is None else delta_bias.unsqueeze(0),
        delta_softplus,
    )
    y = y.squeeze(1).permute(1, 2, 0)  # (batch, dim, L)
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, last.squeeze(0)) if return_last_state else out


def multi_route_selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus=True):
    """Multi-route scan (see `multi_route_selective_scan_ref`) with all routes folded into one batched scan."""
    check_route_shapes(u, delta, A, B, C, D, z, delta_bias, routes)
    R, batch, L, dim = u.shape
    N = A.shape[-1]
    # token order (R, batch, L, .) -> route order, time-major (L, R, batch, .): one gather each
    idx = routes.t().reshape(L, R, 1, 1)

    def gather(t, w):
        return t.permute(2, 0, 1, 3).gather(0, idx.expand(L, R, batch, w))

    y, _ = _scan_tm(gather(u, dim), gather(delta, dim), A, gather(B, N), gather(C, N), D, delta_bias, delta_softplus)
    inv = torch.argsort(routes, dim=1).t().reshape(L, R, 1, 1).expand(L, R, batch, dim)
    out = y.gather(0, inv).mean(1).transpose(0, 1)  # back to token order, merge: (batch, L, dim)
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(u.dtype).contiguous()
