"""The Triton scan's launch layer: the kernels' operand layouts (packing) and one launcher per direction.

Kernel layouts: activations (R, batch, L, dim) with any strides (channel-last is the fast case); A as (R, NP, dim)
float32 pre-scaled by log2(e), NP = N rounded up to a power of two (padded states have A = 0 and zero inputs, so
they stay zero); B and C packed into one (R, batch, L, 2 NP) row tensor [B | C], or [B | C | dt_low] (2 NP + P,
P = the dt rank rounded up) in the forward-only scan that forms delta itself; the saved states (R, batch,
L / chunk, NP, dim) float32. The custom ops (scan_ops, mixer_ops) are the only callers.
"""

from __future__ import annotations

import os

import torch
import triton

from .scan_bwd import _scan_bwd_seq_kernel, _scan_bwd_split_prep_kernel
from .scan_common import LOG2E
from .scan_config import BLOCK_D, NUM_WARPS, ScanConfig, next_pow2
from .scan_fwd import _scan_fwd_seq_kernel, _scan_fwd_split_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# every output buffer starts as NaN, so an element the kernels fail to write shows up (the test suite sets it)
POISON = os.environ.get("VIM_KERNELS_POISON", "0") == "1"


def empty(shape, device, dtype) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if POISON else t


def empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    t = torch.empty_like(x, dtype=dtype)
    return t.fill_(float("nan")) if POISON else t


# ---- operand layouts -------------------------------------------------------------------------------------------------
def pack_A(A: torch.Tensor) -> torch.Tensor:
    """A (R, dim, N), negative -> (R, NP, dim) float32 times log2(e) (exp(dt A) is then one exp2), zero-padded."""
    R, dim, N = A.shape
    NP = next_pow2(N)
    if NP == N:  # one op: launches are a good part of a call at Vim's shapes
        return torch.mul(A.transpose(1, 2), LOG2E, out=torch.empty((R, NP, dim), device=A.device, dtype=torch.float32))
    out = torch.zeros((R, NP, dim), device=A.device, dtype=torch.float32)
    out[:, :N] = A.transpose(1, 2) * LOG2E
    return out


def pack_rows(B: torch.Tensor, C: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """B, C (R, batch, L, N), any strides and dtype -> one (R, batch, L, 2 NP) row tensor [B | C]: a step's B and C
    are then two aligned vectors every lane loads at once. The backward kernels read float32 rows."""
    R, batch, L, N = B.shape
    NP = next_pow2(N)
    if NP == N:
        return torch.cat((B, C), -1, out=torch.empty((R, batch, L, 2 * NP), device=B.device, dtype=dtype))
    rows = torch.zeros((R, batch, L, 2 * NP), device=B.device, dtype=dtype)
    rows[..., :N] = B
    rows[..., NP : NP + N] = C
    return rows


def packed_projection_weight(weight: torch.Tensor, N: int, rank: int) -> torch.Tensor:
    """x_proj's weight (R, rank + 2 N, E), rows [dt | B | C] (Mamba's order), reordered and zero-padded to the rows
    [B | C | dt_low] of the forward-only scan: (R, 2 NP + P, E). x_proj with it writes the scan's operand rows
    directly; the padded columns come out zero, which the kernels read as inert states and ranks."""
    R, _, E = weight.shape
    NP, P = next_pow2(N), next_pow2(rank)
    w = weight.new_zeros((R, 2 * NP + P, E))
    w[:, :N] = weight[:, rank : rank + N]
    w[:, NP : NP + N] = weight[:, rank + N :]
    w[:, 2 * NP : 2 * NP + rank] = weight[:, :rank]
    return w


def pack_dt_proj(dt_proj: torch.Tensor) -> torch.Tensor:
    """dt_proj's weight (R, dim, rank) -> (R, P, dim) float32, zero-padded to a power of two: the kernels' tile."""
    R, dim, rank = dt_proj.shape
    w = torch.zeros((R, next_pow2(rank), dim), device=dt_proj.device, dtype=torch.float32)
    w[:, :rank] = dt_proj.transpose(1, 2)
    return w


def unpack_dBC(dBC: torch.Tensor, N: int, b_dtype, c_dtype):
    """dB, dC (R, batch, L, N) in B's and C's dtypes from the kernels' float32 [dB | dC] (one conversion for both)."""
    NP = dBC.shape[-1] // 2
    if b_dtype == c_dtype:
        dBC = dBC.to(b_dtype)
        return dBC[..., :N], dBC[..., NP : NP + N]
    return dBC[..., :N].to(b_dtype), dBC[..., NP : NP + N].to(c_dtype)


# ---- launchers ---------------------------------------------------------------------------------------------------
def _contiguous(*tensors):
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def launch_fwd(u4, dt4, A2, BC, D, db, z3, out4, routes, softplus: bool, accum: bool, save_last: bool,
               save_states: bool, cfg: ScanConfig, wdt=None):  # fmt: skip
    """One forward pass. u4, dt4, out4: (R, batch, L, dim) views; z3 (batch, L, dim) or None (gates y when not
    accum); accum: every route adds y into out4 (a float32 (batch, L, dim) buffer expanded over R); routes (R, L)
    int64 or None (identity); wdt: dt_proj packed by pack_dt_proj, BC's rows then end with the low-rank rows and
    dt4 is not read. Returns (states or None, last state (R * batch, NP, dim) or None)."""
    # the kernels index these with contiguous strides (no-ops in eager; a compiled graph may hand over other strides)
    A2, BC, D, db, routes, wdt = _contiguous(A2, BC, D, db, routes, wdt)
    R, batch, L, dim = u4.shape
    NP = A2.shape[1]
    T = cfg.chunk
    nchunk = triton.cdiv(L, T)
    dev = u4.device
    hs = empty((R, batch, nchunk, NP, dim), dev, torch.float32) if save_states else A2
    last = empty((R * batch, NP, dim), dev, torch.float32) if save_last else A2
    zz = z3 if z3 is not None else u4[0]
    common = dict(
        HAS_D=D is not None, HAS_DB=db is not None, HAS_Z=z3 is not None, SOFTPLUS=softplus,
        ROUTED=routes is not None, ACCUM=accum, SAVE_LAST=save_last, SAVE_STATES=save_states, T=T, BD=BLOCK_D,
        NP=NP, FAST=not INTERPRET, PREFETCH=0 if INTERPRET else cfg.prefetch,
        DTRP=wdt.shape[1] if wdt is not None else 0, num_warps=NUM_WARPS,
    )  # fmt: skip
    args = (D if D is not None else A2, db if db is not None else A2, zz, out4, hs, last,
            routes if routes is not None else A2)  # fmt: skip
    wd = wdt if wdt is not None else A2
    strides = (*u4.stride(), *dt4.stride(), *zz.stride(), *out4.stride())
    nd = triton.cdiv(dim, BLOCK_D)
    if cfg.fwd == "split" and cfg.seg < L:
        nseg = triton.cdiv(L, cfg.seg)
        hend = torch.empty((R, batch, nseg, NP, dim), device=dev, dtype=torch.float32)
        dtsum = torch.empty((R, batch, nseg, dim), device=dev, dtype=torch.float32)
        for final in (False, True):
            _scan_fwd_split_kernel[(nd, batch, R * (nseg - 1))](
                u4, dt4, A2, BC, *args, hend, dtsum, wd, L, dim, nchunk, batch, nseg, *strides, SEG=cfg.seg,
                FINAL=final, **common,
            )  # fmt: skip
    else:
        _scan_fwd_seq_kernel[(nd, batch, R)](u4, dt4, A2, BC, *args, wd, L, dim, nchunk, batch, *strides, **common)
    return (hs if save_states else None), (last if save_last else None)


def launch_bwd(u4, dt4, A2, BC, D, db, z3, dout4, hs, routes, du4, ddt4, dz3, softplus: bool, cfg: ScanConfig):
    """One backward pass from the forward's saved states hs (taken with the same cfg). Fills du4, ddt4 (and dz3
    when z3 gates y); returns the float32 gradients summed by the kernels' atomics in one flat buffer: dBC, dA, dD,
    d(delta_bias) (see split_grads)."""
    A2, BC, D, db, routes, hs = _contiguous(A2, BC, D, db, routes, hs)
    R, batch, L, dim = u4.shape
    NP = A2.shape[1]
    T = cfg.chunk
    nchunk = triton.cdiv(L, T)
    assert hs.shape[2] == nchunk
    dev = u4.device
    # every atomically summed gradient in one zeroed buffer (one op)
    flat = torch.zeros(R * batch * L * 2 * NP + R * NP * dim + 2 * R * dim, device=dev, dtype=torch.float32)
    dA, dBC, dD, ddb = split_grads(flat, R, batch, L, NP, dim)
    zz = z3 if z3 is not None else u4[0]
    dzz = dz3 if dz3 is not None else u4[0]
    dbb = db if db is not None else A2
    r = routes if routes is not None else A2
    flags = dict(HAS_DB=db is not None, HAS_Z=z3 is not None, SOFTPLUS=softplus, ROUTED=routes is not None,
                 BD=BLOCK_D, NP=NP, FAST=not INTERPRET, num_warps=NUM_WARPS)  # fmt: skip
    nd = triton.cdiv(dim, BLOCK_D)
    seg = cfg.seg if cfg.bwd == "split" and cfg.seg < L else 0
    nseg = triton.cdiv(L, seg) if seg else 1
    gout = dtsum = dA  # stand-ins, never read without a split
    if seg:
        gout = torch.empty((R, batch, nseg, NP, dim), device=dev, dtype=torch.float32)
        dtsum = torch.empty((R, batch, nseg, dim), device=dev, dtype=torch.float32)
        _scan_bwd_split_prep_kernel[(nd, batch, R * nseg)](
            dt4, A2, BC, dbb, zz, dout4, r, gout, dtsum, L, dim, batch, nseg, *dt4.stride(), *zz.stride(),
            *dout4.stride(), SEG=seg, **flags,
        )  # fmt: skip
    opts = {} if INTERPRET or cfg.max_regs is None else {"maxnreg": cfg.max_regs}
    _scan_bwd_seq_kernel[(nd, batch, R * nseg)](
        u4, dt4, A2, BC, D if D is not None else A2, dbb, zz, dout4, hs, r, du4, ddt4, dzz, dA, dBC,
        dD, ddb, gout, dtsum, L, dim, nchunk, batch, nseg,
        *u4.stride(), *dt4.stride(), *zz.stride(), *dout4.stride(), *du4.stride(), *ddt4.stride(), *dzz.stride(),
        HAS_D=D is not None, T=T, SUBS=cfg.subs, SEGC=seg // T, LANE_SUM=NP <= 32, LOG2NP=NP.bit_length() - 1,
        **flags, **opts,
    )  # fmt: skip
    return flat


def split_grads(flat: torch.Tensor, R: int, batch: int, L: int, NP: int, dim: int):
    """The views (dA (R, NP, dim), dBC (R, batch, L, 2 NP), dD (R, dim), ddelta_bias (R, dim)) of launch_bwd's
    buffer (padded states included: callers slice them off)."""
    n_bc, n_a = R * batch * L * 2 * NP, R * NP * dim
    dBC = flat[:n_bc].view(R, batch, L, 2 * NP)
    dA = flat[n_bc : n_bc + n_a].view(R, NP, dim)
    return dA, dBC, flat[n_bc + n_a : n_bc + n_a + R * dim].view(R, dim), flat[n_bc + n_a + R * dim :].view(R, dim)
