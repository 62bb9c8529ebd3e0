"""Triton helpers shared by the scan's forward and backward kernels: loads, stores, steps, the state-tile layout.

Layout of every scan program: one warp, a channel per lane (BD = 32 channels), its NP states in that thread, so
<C_t, h_t> needs no shuffles and the only loop-carried dependency is one FMA per state. Activations are channel-last
(batch, L, dim): a time step of a channel block is one contiguous row, in whatever order a route visits the tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _log2_fast(x, FAST: tl.constexpr):
    # MUFU.LG2 (ptx lg2.approx, ~2^-22 relative error) on the GPU; the accurate log when interpreted, where inline
    # PTX cannot run
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _softplus_fast(x, FAST: tl.constexpr):
    # softplus with torch's threshold of 20, and its derivative sigmoid(x); 1 + 2^(x log2 e) is formed once for both
    e = tl.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    s = 1.0 + e
    sp = tl.where(x <= 20.0, _log2_fast(s, FAST) * 0.6931471805599453, x)
    return sp, tl.where(x <= 20.0, e / s, 1.0)


@triton.jit
def _step_token(route_ptr, t, L, ROUTED: tl.constexpr):
    # the token a route visits at step t, t clamped into [0, L) (a step past the end reads step L-1's inputs and
    # is made inert by the caller)
    tc = tl.minimum(t, L - 1)
    if ROUTED:
        return tl.load(route_ptr + tc)
    return tc.to(tl.int64)


@triton.jit
def _load_once(ptrs, mask):
    # per-channel data a program reads once (activations, saved states): cached in L2 only (.cg), so L1 keeps what
    # is read again (the B and C rows)
    return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _store_once(ptrs, x, mask):
    # outputs and saved states, not read again by the launch that writes them: streaming stores (.cs)
    tl.store(ptrs, x, mask=mask, cache_modifier=".cs")


@triton.jit
def _l2_prefetch(ptrs, mask):
    # prefetch.global.L2 where mask: start moving a future step's rows from HBM into L2 (no register written,
    # nothing waits on it), so the step's real load later meets L2 latency instead of HBM latency
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _step_delta(dt, dbv, live, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    # the step's delta in fp32: + delta_bias, softplus; 0 for a step past the end (decay 1, no input: h passes
    # through unchanged)
    dt = dt.to(tl.float32)
    if HAS_DB:
        dt = dt + dbv
    if SOFTPLUS:
        dt, _ = _softplus_fast(dt, FAST)
    return tl.where(live, dt, 0.0)


@triton.jit
def _state_offsets(rn, rd, DIM):
    # offsets of an (NP, BD) state tile (A, saved states, dA) in a (.., NP, dim) tensor. Its rows are contiguous
    # along the channels; left alone, Triton lays such a tile out for 16-byte accesses (4 channels x 4 states per
    # thread) when the pointers are aligned, and every step of the loops then pays shuffles and shared-memory layout
    # conversions. The divisibility hint of 1 keeps the layout the kernels are written for: one channel per lane,
    # its states in that thread (the accesses stay coalesced: a row is 32 consecutive words across the lanes).
    return tl.multiple_of(rn[:, None] * DIM + rd[None, :], [1, 1])


@triton.jit
def _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D: tl.constexpr, HAS_DB: tl.constexpr,
                   BD: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    # a program's channels rd and states rn, and its per-channel constants: A2 (NP, BD), D and delta_bias (BD,)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    dmask = rd < DIM
    A2 = tl.load(A_ptr + pid_r * NP * DIM + _state_offsets(rn, rd, DIM), mask=dmask[None, :], other=0.0)
    Dv = tl.zeros((BD,), dtype=tl.float32)
    dbv = tl.zeros((BD,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    if HAS_DB:
        dbv = tl.load(db_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    return rd, rn, dmask, A2, Dv, dbv


@triton.jit
def _segment_program(NSEG):
    # split-L grids: axis 2 is route * NSEG + segment
    return (tl.program_id(2) // NSEG).to(tl.int64), tl.program_id(2) % NSEG


@triton.jit
def _store_segment(rec_ptr, dtsum_ptr, rec, x, dts, rn, rd, dmask, DIM, NP: tl.constexpr):
    # a segment's record: its (NP, BD) end value x (state or handed-back adjoint) and its delta sum
    tl.store(rec_ptr + rec * NP * DIM + _state_offsets(rn, rd, DIM), x, mask=dmask[None, :])
    tl.store(dtsum_ptr + rec * DIM + rd, dts, mask=dmask)


@triton.jit
def _fold_segment(x, rec_ptr, dtsum_ptr, rec, A2, rn, rd, dmask, DIM, NP: tl.constexpr):
    # carry x across segment rec: decayed by its total decay exp(A * its delta sum), plus its own end value
    dsum = tl.load(dtsum_ptr + rec * DIM + rd, mask=dmask, other=0.0)
    xk = tl.load(rec_ptr + rec * NP * DIM + _state_offsets(rn, rd, DIM), mask=dmask[None, :], other=0.0)
    return tl.exp2(dsum[None, :] * A2) * x + xk
