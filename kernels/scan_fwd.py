"""Triton forward kernels of the selective scan: the one-step forward (large grids) and the split-L forward (few programs).

Both walk the time steps one at a time with the state tile (NP, BD) in registers (see scan_common). Per step:
delta = softplus(delta + delta_bias), h = exp(delta A) h + delta B u, y = <C, h> + D u. A is passed pre-scaled by
log2(e), so exp(delta A) is one exp2. The small operands of a step, B and C (and, in the forward-only entry, the
low-rank dt rows), are one packed row [B | C (| dt_low)] of the (R, batch, L, row) tensor every lane loads whole.
Outputs: gated y (single route, z given), or y added into a float32 (batch, L, dim) buffer shared by the routes
(ACCUM, merged afterwards by scan_merge); with SAVE_STATES the state every T steps, for the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .scan_common import (
    _channel_block,
    _fold_segment,
    _l2_prefetch,
    _load_once,
    _segment_program,
    _state_offsets,
    _step_delta,
    _step_token,
    _store_once,
    _store_segment,
)


@triton.jit
def _fwd_load(u_base, dt_base, z_base, BC_base, route_ptr, Wdt, t, L, s_u_l, s_dt_l, s_z_l, dmask,
              ROUTED: tl.constexpr, HAS_Z: tl.constexpr, NP: tl.constexpr, DTRP: tl.constexpr):  # fmt: skip
    # inputs of time step t. With DTRP the packed row is [B | C | dt_low] and delta = dt_proj @ dt_low is formed
    # here, one dot product per channel with its (DTRP,) column of dt_proj held in registers (Wdt)
    tok = _step_token(route_ptr, t, L, ROUTED)
    row = BC_base + tok * (2 * NP + DTRP)
    u = _load_once(u_base + tok * s_u_l, dmask)
    if DTRP > 0:
        dt = tl.sum(Wdt * tl.load(row + 2 * NP + tl.arange(0, DTRP)).to(tl.float32)[:, None], axis=0)
    else:
        dt = _load_once(dt_base + tok * s_dt_l, dmask)
    Bt = tl.load(row + tl.arange(0, NP)).to(tl.float32)
    Ct = tl.load(row + NP + tl.arange(0, NP)).to(tl.float32)
    if HAS_Z:
        zv = _load_once(z_base + tok * s_z_l, dmask)
    else:
        zv = u
    return tok, u, dt, Bt, Ct, zv


@triton.jit
def _fwd_prefetch(u_base, dt_base, z_base, BC_base, route_ptr, Wdt, t, L, s_u_l, s_dt_l, s_z_l, dmask,
                  ROUTED: tl.constexpr, HAS_Z: tl.constexpr, NP: tl.constexpr, DTRP: tl.constexpr):  # fmt: skip
    # L2 prefetch of step t's rows (the loads themselves run only one to three steps ahead)
    tok = _step_token(route_ptr, t, L, ROUTED)
    _l2_prefetch(u_base + tok * s_u_l, dmask)
    if DTRP == 0:
        _l2_prefetch(dt_base + tok * s_dt_l, dmask)
    if HAS_Z:
        _l2_prefetch(z_base + tok * s_z_l, dmask)
    rbc = tl.arange(0, 2 * NP)
    row = BC_base + tok * (2 * NP + DTRP)
    _l2_prefetch(row + rbc, rbc >= 0)
    if DTRP > 0:
        rk = tl.arange(0, DTRP)
        _l2_prefetch(row + 2 * NP + rk, rk >= 0)


@triton.jit
def _fwd_step(h, A2, Dv, dbv, tok, u, dt, Bt, Ct, zv, live, o_base, s_o_l, dmask,
              HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
              ACCUM: tl.constexpr, FAST: tl.constexpr, out_dtype: tl.constexpr):  # fmt: skip
    u = u.to(tl.float32)
    dt = _step_delta(dt, dbv, live, HAS_DB, SOFTPLUS, FAST)
    a = tl.exp2(dt[None, :] * A2)
    h = a * h + Bt[:, None] * (dt * u)[None, :]
    y = tl.sum(h * Ct[:, None], axis=0)
    if HAS_D:
        y = y + u * Dv
    o_ptrs = o_base + tok * s_o_l
    if ACCUM:
        # multi-route merge: every route adds its y into one fp32 (batch, L, dim) buffer (relaxed: no fences)
        tl.atomic_add(o_ptrs, y, mask=dmask & live, sem="relaxed")
    else:
        if HAS_Z:
            zf = zv.to(tl.float32)
            y = y * zf * tl.sigmoid(zf)
        _store_once(o_ptrs, y.to(out_dtype), dmask & live)
    return h


@triton.jit
def _delta_source(dt_ptr, wdt_ptr, pid_r, pid_b, rd, dmask, A2, DIM, s_dt_r, s_dt_b, s_dt_d, DTRP: tl.constexpr):
    # where a program's deltas come from: its channels of delta (dt_ptr: (R, batch, L, dim)), or with DTRP the
    # low-rank rows packed beside B and C and this block's (DTRP, BD) tile of the packed dt_proj (wdt_ptr:
    # (R, DTRP, dim) float32), laid out like the state tile; dt_ptr is then unused
    if DTRP > 0:
        rk = tl.arange(0, DTRP)
        Wdt = tl.load(wdt_ptr + pid_r * DTRP * DIM + _state_offsets(rk, rd, DIM), mask=dmask[None, :], other=0.0)
        return dt_ptr, Wdt
    else:
        return dt_ptr + pid_r * s_dt_r + pid_b * s_dt_b + rd * s_dt_d, A2  # A2: a stand-in, never read


@triton.jit
def _scan_fwd_seq_kernel(
    u_ptr, dt_ptr, A_ptr, BC_ptr, D_ptr, db_ptr, z_ptr, out_ptr, hs_ptr, last_ptr, route_ptr, wdt_ptr,
    L, DIM, NCHUNK, BATCH,
    s_u_r, s_u_b, s_u_l, s_u_d,
    s_dt_r, s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_o_r, s_o_b, s_o_l, s_o_d,
    HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ROUTED: tl.constexpr, ACCUM: tl.constexpr, SAVE_LAST: tl.constexpr, SAVE_STATES: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr,
    DTRP: tl.constexpr,
):  # fmt: skip
    # One program per (channel block, batch, route), one time step at a time, four steps per loop iteration with a
    # rotation of four input buffers: while step t computes, steps t+1 .. t+3 are loading. Every load is contiguous
    # along the layout's fast axis, so no layout conversion happens inside the loop. Each step waits on nothing but
    # its own loads, so on a small grid (few programs to switch between) the step time is the load latency over the
    # steps in flight: there PREFETCH > 0 also moves the rows PREFETCH steps ahead into L2. With SAVE_STATES the
    # state before every T-th step is stored (T a multiple of 4, so saved steps start an iteration).
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd, rn, dmask, A2, Dv, dbv = _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D, HAS_DB, BD, NP)
    u_base = u_ptr + pid_r * s_u_r + pid_b * s_u_b + rd * s_u_d
    dt_base, Wdt = _delta_source(dt_ptr, wdt_ptr, pid_r, pid_b, rd, dmask, A2, DIM, s_dt_r, s_dt_b, s_dt_d, DTRP)
    z_base = z_ptr + pid_b * s_z_b + rd * s_z_d
    o_base = out_ptr + pid_r * s_o_r + pid_b * s_o_b + rd * s_o_d
    BC_base = BC_ptr + (pid_r * BATCH + pid_b) * L * (2 * NP + DTRP)  # scalar; + rn at each load
    r_base = route_ptr + pid_r * L
    hs_base = hs_ptr + (pid_r * BATCH + pid_b) * NCHUNK * NP * DIM  # scalar: a tile of pointers costs registers
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    h = tl.zeros((NP, BD), dtype=tl.float32)
    ld = (u_base, dt_base, z_base, BC_base, r_base, Wdt)
    st = (s_u_l, s_dt_l, s_z_l)
    b0 = _fwd_load(*ld, 0, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
    b1 = _fwd_load(*ld, 1, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
    b2 = _fwd_load(*ld, 2, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
    for t in range(0, L, 4):
        b3 = _fwd_load(*ld, t + 3, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        if PREFETCH > 0:
            for k in tl.static_range(4):
                _fwd_prefetch(*ld, t + PREFETCH + k, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        if SAVE_STATES:
            if t % T == 0:
                _store_once(hs_base + (t // T) * NP * DIM + _state_offsets(rn, rd, DIM), h, dmask[None, :])
        h = _fwd_step(h, A2, Dv, dbv, *b0, t < L, o_base, s_o_l, dmask,
                      HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ACCUM, FAST, out_dtype)  # fmt: skip
        b0 = _fwd_load(*ld, t + 4, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        h = _fwd_step(h, A2, Dv, dbv, *b1, t + 1 < L, o_base, s_o_l, dmask,
                      HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ACCUM, FAST, out_dtype)  # fmt: skip
        b1 = _fwd_load(*ld, t + 5, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        h = _fwd_step(h, A2, Dv, dbv, *b2, t + 2 < L, o_base, s_o_l, dmask,
                      HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ACCUM, FAST, out_dtype)  # fmt: skip
        b2 = _fwd_load(*ld, t + 6, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        h = _fwd_step(h, A2, Dv, dbv, *b3, t + 3 < L, o_base, s_o_l, dmask,
                      HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ACCUM, FAST, out_dtype)  # fmt: skip
    if SAVE_LAST:
        tl.store(last_ptr + (pid_r * BATCH + pid_b) * NP * DIM + _state_offsets(rn, rd, DIM), h, mask=dmask[None, :])


@triton.jit
def _segment_scan(h, A2, Dv, dbv, u_base, dt_base, z_base, BC_base, r_base, Wdt, s_u_l, s_dt_l, s_z_l,
                  t0, t1, L, o_base, s_o_l, hs_base, rn, rd, dmask, DIM,
                  HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                  ROUTED: tl.constexpr, ACCUM: tl.constexpr, SAVE_STATES: tl.constexpr, T: tl.constexpr,
                  BD: tl.constexpr, NP: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr,
                  DTRP: tl.constexpr, WRITE: tl.constexpr, out_dtype: tl.constexpr):  # fmt: skip
    # steps t0 .. t1 - 1 of a split program from state h: WRITE, writing y (and the saved chunk states) exactly as
    # the one-step forward does; else only the state and the sum of the deltas (returned; 0 when WRITE)
    dts = tl.zeros((BD,), dtype=tl.float32)
    ld = (u_base, dt_base, z_base, BC_base, r_base, Wdt)
    st = (s_u_l, s_dt_l, s_z_l)
    b0 = _fwd_load(*ld, t0, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
    for t in range(t0, t1, 2):  # t0 (0 or a segment start) a multiple of T, T even: saved steps come first in a pair
        b1 = _fwd_load(*ld, t + 1, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        if PREFETCH > 0:
            _fwd_prefetch(*ld, t + PREFETCH, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
            _fwd_prefetch(*ld, t + PREFETCH + 1, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        if WRITE:
            if SAVE_STATES:
                if t % T == 0:
                    _store_once(hs_base + (t // T) * NP * DIM + _state_offsets(rn, rd, DIM), h, dmask[None, :])
            h = _fwd_step(h, A2, Dv, dbv, *b0, t < t1, o_base, s_o_l, dmask,
                          HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ACCUM, FAST, out_dtype)  # fmt: skip
            b0 = _fwd_load(*ld, t + 2, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
            h = _fwd_step(h, A2, Dv, dbv, *b1, t + 1 < t1, o_base, s_o_l, dmask,
                          HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ACCUM, FAST, out_dtype)  # fmt: skip
        else:
            for k in tl.static_range(2):
                _, u, dt, Bt, _, _ = b0 if k == 0 else b1
                dt = _step_delta(dt, dbv, t + k < t1, HAS_DB, SOFTPLUS, FAST)
                h = tl.exp2(dt[None, :] * A2) * h + Bt[:, None] * (dt * u.to(tl.float32))[None, :]
                dts += dt
                if k == 0:
                    b0 = _fwd_load(*ld, t + 2, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
    return h, dts


@triton.jit
def _scan_fwd_split_kernel(
    u_ptr, dt_ptr, A_ptr, BC_ptr, D_ptr, db_ptr, z_ptr, out_ptr, hs_ptr, last_ptr, route_ptr, hend_ptr, dtsum_ptr,
    wdt_ptr, L, DIM, NCHUNK, BATCH, NSEG,
    s_u_r, s_u_b, s_u_l, s_u_d,
    s_dt_r, s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_o_r, s_o_b, s_o_l, s_o_d,
    HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ROUTED: tl.constexpr, ACCUM: tl.constexpr, SAVE_LAST: tl.constexpr, SAVE_STATES: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr,
    SEG: tl.constexpr, FINAL: tl.constexpr, DTRP: tl.constexpr,
):  # fmt: skip
    # L split into NSEG >= 2 segments of SEG steps, one program per (channel block, batch, route, segment): about
    # NSEG times the programs of the one-step forward, for grids that have too few to hide the step's load latency
    # (long L, small batch). Two launches, each over NSEG - 1 segments (grid axis 2: route * (NSEG - 1) + segment):
    # FINAL False, segments 0 .. NSEG - 2: each segment's scan from a zero state; stores its end state and the sum
    #   of its deltas (its total decay is exp(A * that sum)). Segment 0 starts from the true (zero) state, so it
    #   writes its output here. The last segment's end state is never needed.
    # FINAL True, segments 1 .. NSEG - 1: each segment's start state from the earlier segments' records,
    #   h = exp(A sum_k) h + hend_k for k < s, then the segment again from that state, writing y (and the saved
    #   chunk states) exactly as the one-step forward does.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r, seg = _segment_program(NSEG - 1)
    seg += FINAL
    rd, rn, dmask, A2, Dv, dbv = _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D, HAS_DB, BD, NP)
    u_base = u_ptr + pid_r * s_u_r + pid_b * s_u_b + rd * s_u_d
    dt_base, Wdt = _delta_source(dt_ptr, wdt_ptr, pid_r, pid_b, rd, dmask, A2, DIM, s_dt_r, s_dt_b, s_dt_d, DTRP)
    z_base = z_ptr + pid_b * s_z_b + rd * s_z_d
    o_base = out_ptr + pid_r * s_o_r + pid_b * s_o_b + rd * s_o_d
    BC_base = BC_ptr + (pid_r * BATCH + pid_b) * L * (2 * NP + DTRP)
    r_base = route_ptr + pid_r * L
    hs_base = hs_ptr + (pid_r * BATCH + pid_b) * NCHUNK * NP * DIM
    rb = (pid_r * BATCH + pid_b) * NSEG  # this (route, batch)'s first segment record
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    t0 = seg * SEG
    t1 = tl.minimum(t0 + SEG, L)
    h = tl.zeros((NP, BD), dtype=tl.float32)
    ld = (u_base, dt_base, z_base, BC_base, r_base, Wdt, s_u_l, s_dt_l, s_z_l)
    where = (o_base, s_o_l, hs_base, rn, rd, dmask, DIM)
    if FINAL:
        for k in range(0, seg):
            h = _fold_segment(h, hend_ptr, dtsum_ptr, rb + k, A2, rn, rd, dmask, DIM, NP)
        h, _ = _segment_scan(h, A2, Dv, dbv, *ld, t0, t1, L, *where, HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ROUTED, ACCUM,
                             SAVE_STATES, T, BD, NP, FAST, PREFETCH, DTRP, True, out_dtype)  # fmt: skip
        if SAVE_LAST:
            if seg == NSEG - 1:
                last = last_ptr + (pid_r * BATCH + pid_b) * NP * DIM + _state_offsets(rn, rd, DIM)
                tl.store(last, h, mask=dmask[None, :])
    else:
        if seg == 0:  # its delta sum is never read: the fold starts from a zero state
            h, dts = _segment_scan(h, A2, Dv, dbv, *ld, t0, t1, L, *where, HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ROUTED,
                                   ACCUM, SAVE_STATES, T, BD, NP, FAST, PREFETCH, DTRP, True, out_dtype)  # fmt: skip
        else:
            h, dts = _segment_scan(h, A2, Dv, dbv, *ld, t0, t1, L, *where, HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ROUTED,
                                   ACCUM, SAVE_STATES, T, BD, NP, FAST, PREFETCH, DTRP, False, out_dtype)  # fmt: skip
        _store_segment(hend_ptr, dtsum_ptr, rb + seg, h, dts, rn, rd, dmask, DIM, NP)
