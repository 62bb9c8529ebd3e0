"""Export scan backend: the selective scan as a chunked associative scan of standard tensor ops (ONNX, torch.export).

The recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(delta_t A), b_t = delta_t u_t B_t) is associative in the pairs
(a, b): (a1, b1) then (a2, b2) is (a2 a1, a2 b1 + b2). It is evaluated in two levels, each a log-step
(Hillis-Steele) scan, so the traced graph has O(log L) operations whatever the sequence length and no loop over
tokens:

1. the tokens are cut into chunks of `CHUNK` steps; inside every chunk, log2(CHUNK) doubling steps give each
   step's state from a zero start and the decay accumulated since the chunk began;
2. the chunks' end states are scanned the same way (log2(number of chunks) steps on a tensor CHUNK times smaller),
   and each chunk's incoming state, times the accumulated decay, is added to its steps.

Only products of decays a_t in (0, 1] are formed (delta >= 0 after softplus, A < 0): a large delta * |A|
underflows to 0, nothing overflows, and no exp of a positive cumulative sum ever appears. The states are
materialised for the whole sequence, (R, batch, L, dim, N) float32, as the `torch` backend does per batch block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_route_shapes, check_scan_shapes

# steps per chunk: the full-size state tensor goes through log2(CHUNK) + 1 passes, the chunk-level scan through
# log2(L / CHUNK) passes of a CHUNK times smaller one
CHUNK = 8


def _shift(x: torch.Tensor, k: int, dim: int, fill: float) -> torch.Tensor:
    """x moved k steps later along `dim` (its first k entries `fill`, its last k dropped): one pad, whose negative
    width at the end crops (one ONNX Pad)."""
    widths = [0, 0] * (x.dim() - 1 - dim) + [k, -k]  # F.pad lists (before, after) from the last dimension back
    return F.pad(x, widths, value=fill)


def _doubling_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along `dim` in ceil(log2(length)) steps.

    Returns (prod_{s <= t} a_s, h_t). After the step of offset k, position t holds the pair composed over its last
    2k steps (fewer at the start, where the shifted-in pairs are the identity (1, 0))."""
    k = 1
    while k < a.shape[dim]:
        b = torch.addcmul(b, a, _shift(b, k, dim, 0.0))
        a = a * _shift(a, k, dim, 1.0)
        k *= 2
    return a, b


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 2 of (R, batch, L, ...) tensors, h_{-1} = 0; the two-level scan of the
    module docstring. a must lie in [0, 1] for the products to stay bounded."""
    length = a.shape[2]
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:  # identity steps (a = 1, b = 0) at the end change no earlier state
        widths = [0, 0] * (a.dim() - 3) + [0, pad]
        a, b = F.pad(a, widths, value=1.0), F.pad(b, widths, value=0.0)
    shape = (*a.shape[:2], chunks, chunk, *a.shape[3:])
    decay, local = _doubling_scan(a.reshape(shape), b.reshape(shape), dim=3)
    # states at the chunk ends, then the state each chunk starts from (the previous chunk's end; zero for the first)
    _, ends = _doubling_scan(decay.select(3, chunk - 1), local.select(3, chunk - 1), dim=2)
    start = _shift(ends, 1, 2, 0.0).unsqueeze(3)
    h = torch.addcmul(local, decay, start)
    return h.reshape(*h.shape[:2], chunks * chunk, *h.shape[4:]).narrow(2, 0, length)


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    # no cast where there is nothing to cast: a traced no-op cast is still two graph nodes for the exporters
    return t if t is None or t.dtype == torch.float32 else t.float()


def _scan_routes(u, delta, A, B, C, D, delta_bias, softplus):
    """float32 core in route order: u, delta (R, batch, L, dim); A (R, dim, N); B, C (R, batch, L, N); D, delta_bias
    (R, dim) or None. Returns y (R, batch, L, dim) with the D skip, and the last state (R, batch, dim, N)."""
    u, delta, A, B, C, D, delta_bias = map(_float32, (u, delta, A, B, C, D, delta_bias))
    if delta_bias is not None:
        delta = delta + delta_bias[:, None, None, :]
    if softplus:
        delta = F.softplus(delta)
    a = torch.exp(delta.unsqueeze(-1) * A[:, None, None])  # (R, batch, L, dim, N), in [0, 1]
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(-2)
    h = linear_recurrence(a, b)
    y = torch.matmul(h, C.unsqueeze(-1)).squeeze(-1)  # <C_t, h_t> over N
    if D is not None:
        y = y + u * D[:, None, None, :]
    return y, h.select(2, h.shape[2] - 1)


def selective_scan_parallel(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Same function and signature as `selective_scan_ref` (u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, N, L); D, delta_bias (dim,)), computed by the chunked associative scan."""
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    one_route = lambda t: None if t is None else t.transpose(-1, -2).unsqueeze(0)  # noqa: E731 - (1, batch, L, .)
    y, last = _scan_routes(
        one_route(u),
        one_route(delta),
        A.unsqueeze(0),
        one_route(B),
        one_route(C),
        None if D is None else D.unsqueeze(0),
        None if delta_bias is None else delta_bias.unsqueeze(0),
        delta_softplus,
    )
    y = y.squeeze(0).transpose(1, 2)  # (batch, dim, L)
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(u.dtype)
    return (out, last.squeeze(0)) if return_last_state else out


def multi_route_selective_scan_parallel(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus=True):
    """Multi-route scan (see `multi_route_selective_scan_ref`): every route gathered into its visiting order, all
    routes scanned at once by the chunked associative scan, scattered back to token order, merged and gated."""
    check_route_shapes(u, delta, A, B, C, D, z, delta_bias, routes)
    R, batch, L, dim = u.shape
    N = A.shape[-1]
    order = routes.reshape(R, 1, L, 1)

    def gather(t, width):
        return t.gather(2, order.expand(R, batch, L, width))

    y, _ = _scan_routes(gather(u, dim), gather(delta, dim), A, gather(B, N), gather(C, N), D, delta_bias, delta_softplus)
    # the step at which each route visits each token (scattered, not argsorted: a traced argsort is a TopK, which
    # ONNX's constant folding leaves in the graph)
    steps = torch.arange(L, device=routes.device).expand(R, L)
    back = torch.zeros_like(routes).scatter(1, routes, steps).reshape(R, 1, L, 1).expand(R, batch, L, dim)
    out = y.gather(2, back).mean(0)  # token order, merged: (batch, L, dim)
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(u.dtype)
