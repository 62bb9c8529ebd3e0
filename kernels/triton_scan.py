"""Triton selective scan: one-step (seq) and chunked forward/backward kernels, single- and multi-route, behind autograd Functions."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Launch shape. T: time steps per saved chunk (the forward saves the state every T steps for the backward, which
# recomputes the rest); BD: channels per program. The kernels take channel-last activations (batch, L, dim), so
# a time step of a channel block is one contiguous load; A as (R, NP, dim) pre-scaled by log2(e); B and C packed
# into one fp32 (R, batch, L, 2 NP) tensor [B | C]; the saved states as (R, batch, L/T, NP, dim). The backward
# always uses the forward's T (passed along with the saved states), so the backward configs carry no T.
# fwd kind "seq": _scan_fwd_seq_kernel, one time step per iteration with the next step's inputs loaded while the
# current one computes; "chunk": _scan_fwd_kernel, one associative scan over T steps at a time (more
# parallelism per program: used where the grid is too small to hide the one-step kernel's latency).
# bwd kind "seq": _scan_bwd_seq_kernel (see its comment), SUBS sub-chunks per saved chunk; "chunk":
# _scan_bwd_kernel (two associative scans per chunk). fwd kind "split": _scan_fwd_split_kernel, L split into
# segments of SEG steps, one program per segment, two launches; bwd "seq" with SEG likewise:
# _scan_bwd_split_prep_kernel, then one _scan_bwd_seq_kernel program per segment. "auto": seq where the grid has
# >= _SEQ_MIN_PROGRAMS programs, else the *_SMALL_GRID settings (split L). BD below 32 with one warp: 32 / BD lanes
# share a channel, each holding 16 BD / 32 of its states (the default layout of the (NP, BD) tile, which PIN keeps:
# see _state_offsets; y is then summed by shuffles).
# Forward "seq" only: DEPTH (2 or 4) steps per loop iteration, DEPTH - 1 of them loading while one computes.
# PREFETCH: seq / split forward, steps ahead (0 = off), an L2 prefetch of that step's rows; chunked kernels (bool),
# the next (fwd) / previous (bwd) chunk (the one-step backward with the previous chunk prefetched measured no gain).
# maxnreg caps registers per thread. Seq backward: FLAT, one sub-chunk per loop iteration ("auto": when a chunk
# has several); AHEAD, how its per-channel rows are loaded (see _scan_bwd_seq_kernel; 1 by default).
# Under the interpreter every program costs seconds, so grids are kept tiny there; BD 32 with one warp is the
# layout the seq backward's lane reduce-scatter is written for, and the tests run it as the GPU does.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CONFIG = {
    "fwd": {"kind": "chunk", "T": 4, "BD": 4, "num_warps": 1}
    if _INTERPRET
    else {"kind": "auto", "T": "auto", "BD": 32, "num_warps": 1, "DEPTH": 4},
    "bwd": {"kind": "seq", "SUBS": 2, "BD": 32, "num_warps": 1, "FLAT": "auto", "AHEAD": 1}
    if _INTERPRET
    else {"kind": "auto", "SUBS": "auto", "BD": 32, "num_warps": 1, "maxnreg": "auto", "FLAT": "auto", "AHEAD": 1},
}
# T "auto" (seq kernels): 4 when the saved chunk states, (R, batch, L/T, 16, dim) fp32, fit in _STATE_BUDGET, else 8;
# SUBS "auto": sub-chunks of 4 steps in the backward. T 4 is faster, T 8 halves the saved states: H100, Vim-S
# training at batch 128 (R 2, 629 MB a layer at T 4): 1188 img/s / 25.9 GiB with T 4, 1168 / 18.8 with T 8
# (benchmarks/README.md). VIM_SCAN_CONFIG='{"fwd": {"T": 4}}' forces one.
_STATE_BUDGET = 320 * 2**20
# "auto": the seq kernels where the grid has >= _SEQ_MIN_PROGRAMS one-warp programs of 32 channels, else these
# (the forward and the backward of one call always take the same branch).
_SEQ_MIN_PROGRAMS = 1024
# Small grids (long L, small batch): L split into segments of SEG steps, one program per segment (the one-step
# kernels' time per step is the memory latency they wait on, so what they need is more programs in flight). A
# small grid with L <= SEG runs the unsplit kernels. H200, bf16 (benchmarks/README.md), at (16, 384, 6085):
# forward 0.72-0.79 ms (one program per channel block, 4 steps in flight + L2 prefetch: 1.75), backward 3.42 ms (the
# chunked kernel: 7.27); vim_tiny at 1248, batch 16: 278 img/s (201), batch-1 latency 21-36 ms (59).
_FWD_SMALL_GRID = {"kind": "split", "SEG": 256, "T": 8, "BD": 32, "num_warps": 1, "PREFETCH": 16}
_BWD_SMALL_GRID = {"kind": "seq", "SEG": 256, "SUBS": 2, "BD": 32, "num_warps": 1}
# VIM_SCAN_CONFIG='{"fwd": {...}, "bwd": {...}, "fwd_small": {...}, "bwd_small": {...}}' overrides entries of
# CONFIG and of the small-grid settings (benchmarks try variants this way; scan.py --variants writes its choice so)
if os.environ.get("VIM_SCAN_CONFIG"):
    import json as _json

    _TABLES = {"fwd": CONFIG["fwd"], "bwd": CONFIG["bwd"], "fwd_small": _FWD_SMALL_GRID, "bwd_small": _BWD_SMALL_GRID}
    try:
        _override = _json.loads(os.environ["VIM_SCAN_CONFIG"])
    except _json.JSONDecodeError as _e:
        raise ValueError(
            f'VIM_SCAN_CONFIG is not JSON ({_e}); e.g. VIM_SCAN_CONFIG=\'{{"fwd": {{"T": 4}}}}\''
        ) from None
    for _k, _v in _override.items():
        if _k not in _TABLES or not isinstance(_v, dict):
            raise ValueError(f"VIM_SCAN_CONFIG: {_k!r} must be one of {sorted(_TABLES)}, each mapping to an object")
        _TABLES[_k].update(_v)


def _small_grid(batch: int, dim: int, R: int) -> bool:
    return batch * R * triton.cdiv(dim, 32) < _SEQ_MIN_PROGRAMS


def _fwd_config(batch: int, dim: int, R: int, L: int, NP: int) -> dict:
    cfg = dict(CONFIG["fwd"])
    if cfg.get("kind") == "auto":
        cfg["kind"] = "seq"
        if _small_grid(batch, dim, R):
            cfg.update(_FWD_SMALL_GRID)
    if cfg["T"] == "auto":
        cfg["T"] = 4 if R * batch * triton.cdiv(L, 4) * NP * dim * 4 <= _STATE_BUDGET else 8
    if cfg.get("DEPTH", 2) not in (2, 4):
        raise ValueError(f"vim_kernels: the forward's DEPTH must be 2 or 4; got {cfg['DEPTH']}")
    if cfg["kind"] == "split" and cfg["SEG"] >= L:
        cfg["kind"] = "seq"  # one segment: the plain one-step forward does the same in one pass
    if cfg["kind"] == "seq" and cfg["T"] % cfg.get("DEPTH", 2):
        cfg["DEPTH"] = 2  # the forward saves states at the first step of an iteration: DEPTH must divide T
    return cfg


def _bwd_config(batch: int, dim: int, R: int, T: int) -> dict:
    # T: the chunk length the forward saved its states with (it wins over the backward config's)
    cfg = dict(CONFIG["bwd"])
    if cfg.get("kind") == "auto":
        cfg["kind"] = "seq"
        if _small_grid(batch, dim, R):
            cfg.update(_BWD_SMALL_GRID)
    cfg["T"] = T
    if cfg.get("SUBS") == "auto":
        cfg["SUBS"] = max(1, T // 4)  # sub-chunks of 4 steps: no register spills (see _scan_bwd_seq_kernel)
    if T % cfg.get("SUBS", 1):
        cfg["SUBS"] = 1
    if cfg.get("FLAT") == "auto":
        cfg["FLAT"] = cfg["SUBS"] > 1  # one sub-chunk per loop iteration: the unrolled body stays one sub-chunk
    if cfg.get("maxnreg") == "auto":
        # one-step backward with one sub-chunk in the loop body: capped at 168 registers (12 one-warp programs per
        # SM instead of 8). H200, (128, 768, 197), T 4: 0.86 vs 1.14 ms. H100, T 8 (FLAT): fwd+bwd 1.36 vs 1.59 ms.
        # With sub-chunks unrolled (FLAT off) the cap spills more: slower.
        one_body = cfg["SUBS"] == 1 or cfg.get("FLAT")
        cfg["maxnreg"] = 168 if cfg["kind"] == "seq" and one_body else None
    return cfg


# Tests set this: every output buffer then starts as NaN, so an element the kernels fail to write shows up.
POISON = False


def _empty(*shape, like=None, **kw):
    t = torch.empty_like(like, **kw) if like is not None else torch.empty(*shape, **kw)
    return t.fill_(float("nan")) if POISON else t


@triton.jit
def _comb_fwd(a1, x1, a2, x2):
    # (a1, x1) is the earlier segment: h = a2 * (a1 * h0 + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _comb_bwd(l1, q1, g1, l2, q2, g2):
    # Reverse-time recurrence g_t = c_t + a_{t+1} g_{t+1}, scanned with reverse=True (Triton: flip, scan, flip),
    # so (l1, q1, g1) summarises the *later* time steps. The a multiplying an incoming g belongs to the step
    # that produced it (a shift by one); a segment therefore carries l = a of its earliest step (what it passes
    # on), q = product of the other steps' a (what an incoming value is multiplied by), g = its value.
    t = q2 * l1
    return l2, t * q1, g2 + t * g1


@triton.jit
def _softplus(x):
    # torch's threshold of 20; exp of the clamped value so the unused branch cannot overflow
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, db_ptr, z_ptr, out_ptr, hs_ptr, last_ptr, route_ptr,
    L, DIM, N, NCHUNK, BATCH,
    s_u_r, s_u_b, s_u_l, s_u_d,
    s_dt_r, s_dt_b, s_dt_l, s_dt_d,
    s_B_r, s_B_b, s_B_l, s_B_n,
    s_C_r, s_C_b, s_C_l, s_C_n,
    s_z_b, s_z_l, s_z_d,
    s_o_r, s_o_b, s_o_l, s_o_d,
    HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ROUTED: tl.constexpr, ACCUM: tl.constexpr, SAVE_LAST: tl.constexpr, SAVE_STATES: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    rk = tl.arange(0, T)
    dmask = rd < DIM
    nmask = rn < N
    # padded channels/states get A = 0 (decay 1) and zero inputs, so they stay exactly zero
    A2 = tl.load(A_ptr + pid_r * NP * DIM + rn[None, :] * DIM + rd[:, None], mask=dmask[:, None], other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    if HAS_DB:
        dbv = tl.load(db_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    u_base = u_ptr + pid_r * s_u_r + pid_b * s_u_b
    dt_base = dt_ptr + pid_r * s_dt_r + pid_b * s_dt_b
    B_base = B_ptr + pid_r * s_B_r + pid_b * s_B_b
    C_base = C_ptr + pid_r * s_C_r + pid_b * s_C_b
    o_base = out_ptr + pid_r * s_o_r + pid_b * s_o_b
    hs_base = hs_ptr + (pid_r * BATCH + pid_b) * NCHUNK * DIM * NP
    first = (rk == 0)[:, None, None]
    last = (rk == T - 1)[:, None, None]
    h = tl.zeros((BD, NP), dtype=tl.float32)
    for c in range(NCHUNK):
        t = c * T + rk
        tmask = t < L
        if ROUTED:
            # step t of route r visits token routes[r, t]: every load/store goes through the index map
            tok = tl.load(route_ptr + pid_r * L + t, mask=tmask, other=0)
        else:
            tok = t.to(tl.int64)
        m2 = tmask[:, None] & dmask[None, :]
        mn = tmask[:, None] & nmask[None, :]
        if PREFETCH:  # the next chunk's rows into L2 while this one computes
            tp = (c + 1) * T + rk
            tokp = tl.load(route_ptr + pid_r * L + tp, mask=tp < L, other=0) if ROUTED else tp.to(tl.int64)
            mp = (tp < L)[:, None] & dmask[None, :]
            _l2_prefetch(u_base + tokp[:, None] * s_u_l + rd[None, :] * s_u_d, mp)
            _l2_prefetch(dt_base + tokp[:, None] * s_dt_l + rd[None, :] * s_dt_d, mp)
            if HAS_Z and not ACCUM:
                _l2_prefetch(z_ptr + pid_b * s_z_b + tokp[:, None] * s_z_l + rd[None, :] * s_z_d, mp)
        u = tl.load(u_base + tok[:, None] * s_u_l + rd[None, :] * s_u_d, mask=m2, other=0.0).to(tl.float32)
        dt = tl.load(dt_base + tok[:, None] * s_dt_l + rd[None, :] * s_dt_d, mask=m2, other=0.0).to(tl.float32)
        if HAS_DB:
            dt = dt + dbv[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m2, dt, 0.0)  # steps past L: decay 1, no input, so h passes through unchanged
        Bt = tl.load(B_base + tok[:, None] * s_B_l + rn[None, :] * s_B_n, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_base + tok[:, None] * s_C_l + rn[None, :] * s_C_n, mask=mn, other=0.0).to(tl.float32)
        # chunk-start state, for the backward's recomputation
        if SAVE_STATES:
            tl.store(hs_base + c * NP * DIM + rn[None, :] * DIM + rd[:, None], h, mask=dmask[:, None])
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])
        x = (dt * u)[:, :, None] * Bt[:, None, :]
        x = x + tl.where(first, a * h[None, :, :], 0.0)
        _, hh = tl.associative_scan((a, x), 0, _comb_fwd)
        y = tl.sum(hh * Ct[:, None, :], axis=2)
        if HAS_D:
            y = y + u * Dv[None, :]
        h = tl.sum(tl.where(last, hh, 0.0), axis=0)
        o_ptrs = o_base + tok[:, None] * s_o_l + rd[None, :] * s_o_d
        if ACCUM:
            # multi-route merge: every route adds its y into one fp32 (batch, L, dim) buffer
            tl.atomic_add(o_ptrs, y, mask=m2, sem="relaxed")
        else:
            if HAS_Z:
                zv = tl.load(z_ptr + pid_b * s_z_b + tok[:, None] * s_z_l + rd[None, :] * s_z_d, mask=m2, other=0.0)
                zv = zv.to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m2)
    if SAVE_LAST:
        tl.store(
            last_ptr + (pid_r * BATCH + pid_b) * NP * DIM + rn[None, :] * DIM + rd[:, None], h, mask=dmask[:, None]
        )


@triton.jit
def _log2_fast(x, FAST: tl.constexpr):
    # MUFU.LG2 (ptx lg2.approx, ~2^-22 relative error) on the GPU; the accurate log (a ~25-instruction polynomial) when
    # interpreted, where inline PTX cannot run
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
    # is read again (B and C rows, spilled registers). With _store_once, H100, fwd+bwd GPU time at (128, 768, 197):
    # T 4 1.048 -> 1.035 ms, T 8 1.196 -> 1.177 (evict-first hints instead: 1.056 and 1.164)
    return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _store_once(ptrs, x, mask):
    # outputs and saved states, not read again by the launch that writes them: streaming stores (.cs)
    tl.store(ptrs, x, mask=mask, cache_modifier=".cs")


@triton.jit
def _fwd_load(u_base, dt_base, z_base, BC_base, route_ptr, Wdt, t, L, s_u_l, s_dt_l, s_z_l, dmask,
              ROUTED: tl.constexpr, HAS_Z: tl.constexpr, NP: tl.constexpr, DTRP: tl.constexpr):  # fmt: skip
    # inputs of time step t. A step's row of the packed small operands is [B | C] (2 NP values), or with DTRP
    # [B | C | dt_low] (2 NP + DTRP): delta = dt_proj @ dt_low is then formed here, one dot product per channel with
    # its (DTRP,) column of dt_proj held in registers (Wdt); the row is loaded as B and C are (every lane the same
    # aligned vector, no layout change). The rows are float32, or 16-bit in the forward-only entry (see _pack)
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
def _l2_prefetch(ptrs, mask):
    # prefetch.global.L2 where mask: start moving a future step's rows from HBM into L2 (no register written,
    # nothing waits on it), so the step's real load later meets L2 latency instead of HBM latency
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _fwd_prefetch(u_base, dt_base, z_base, BC_base, route_ptr, Wdt, t, L, s_u_l, s_dt_l, s_z_l, dmask,
                  ROUTED: tl.constexpr, HAS_Z: tl.constexpr, NP: tl.constexpr, DTRP: tl.constexpr):  # fmt: skip
    # L2 prefetch of step t's rows (the one-step forward's loads run only a step or three ahead)
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
def _state_offsets(rn, rd, DIM, PIN: tl.constexpr):
    # offsets of an (NP, BD) state tile (A, saved states, dA) in a (.., NP, dim) tensor. Its rows are contiguous
    # along the channels; at run time (16-byte aligned pointers, dim % 16 == 0) Triton then lays the tile out for
    # 16-byte accesses, 4 channels x 4 states per thread, and the whole loop follows: <C_t, h_t> needs shuffles and
    # every step converts u, delta, y between layouts through shared memory (sm_90 SASS of the backward: ~30 STS/LDS
    # and 18 barriers per step). PIN hints the offsets' divisibility as 1, so the tile keeps the layout the kernels
    # are written for: one channel per lane (32 / BD lanes per channel when BD < 32), its states in that thread;
    # the accesses stay coalesced (a row is 32 consecutive words across the lanes).
    offs = rn[:, None] * DIM + rd[None, :]
    if PIN:
        offs = tl.multiple_of(offs, [1, 1])
    return offs


@triton.jit
def _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D: tl.constexpr, HAS_DB: tl.constexpr,
                   BD: tl.constexpr, NP: tl.constexpr, PIN: tl.constexpr):  # fmt: skip
    # a seq program's channels rd and states rn, and its per-channel constants: A2 (NP, BD), D and delta_bias (BD,)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    dmask = rd < DIM
    A2 = tl.load(A_ptr + pid_r * NP * DIM + _state_offsets(rn, rd, DIM, PIN), mask=dmask[None, :], other=0.0)
    Dv = tl.zeros((BD,), dtype=tl.float32)
    dbv = tl.zeros((BD,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    if HAS_DB:
        dbv = tl.load(db_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    return rd, rn, dmask, A2, Dv, dbv


@triton.jit
def _delta_source(dt_ptr, wdt_ptr, pid_r, pid_b, rd, dmask, A2, DIM, s_dt_r, s_dt_b, s_dt_d,
                  PIN: tl.constexpr, DTRP: tl.constexpr):  # fmt: skip
    # where a forward program's deltas come from: its channels of delta (dt_ptr: (R, batch, L, dim)), or with DTRP
    # the low-rank rows packed beside B and C (see _fwd_load) and this block's (DTRP, BD) tile of the packed dt_proj
    # (wdt_ptr: (R, DTRP, dim) float32), laid out like the state tile (see _state_offsets); dt_ptr is then unused
    if DTRP > 0:
        rk = tl.arange(0, DTRP)
        Wdt = tl.load(wdt_ptr + pid_r * DTRP * DIM + _state_offsets(rk, rd, DIM, PIN), mask=dmask[None, :], other=0.0)
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
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, FAST: tl.constexpr, DEPTH: tl.constexpr,
    PREFETCH: tl.constexpr, PIN: tl.constexpr, DTRP: tl.constexpr,
):  # fmt: skip
    # One time step at a time. The state tile is (NP, BD): channels across lanes, a channel's NP states inside one
    # thread, so <C_t, h_t> needs no shuffles and the only loop-carried dependency is one FMA per state (with
    # BD < 32, 32 / BD lanes split a channel's states and <C_t, h_t> costs log2(32 / BD) shuffles).
    # Every load (A, the state, u/dt/z rows, B/C rows) is contiguous along the layout's fast axis, so no layout
    # conversion (shared memory, barrier) happens inside the loop. DEPTH steps per iteration, a rotation of DEPTH
    # input buffers: while step t computes, steps t+1 .. t+DEPTH-1 are loading. Each step waits on nothing but its
    # own loads, so at long L (few programs, nothing else to switch to) the step time is the load latency divided
    # by how many steps are in flight: hence DEPTH 4 and the L2 prefetch PREFETCH steps ahead.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd, rn, dmask, A2, Dv, dbv = _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D, HAS_DB, BD, NP, PIN)
    u_base = u_ptr + pid_r * s_u_r + pid_b * s_u_b + rd * s_u_d
    dt_base, Wdt = _delta_source(dt_ptr, wdt_ptr, pid_r, pid_b, rd, dmask, A2, DIM, s_dt_r, s_dt_b, s_dt_d, PIN, DTRP)
    z_base = z_ptr + pid_b * s_z_b + rd * s_z_d
    o_base = out_ptr + pid_r * s_o_r + pid_b * s_o_b + rd * s_o_d
    BC_base = BC_ptr + (pid_r * BATCH + pid_b) * L * (2 * NP + DTRP)  # scalar; + rn at each load
    r_base = route_ptr + pid_r * L
    hs_base = hs_ptr + (pid_r * BATCH + pid_b) * NCHUNK * NP * DIM  # scalar: see the backward
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    h = tl.zeros((NP, BD), dtype=tl.float32)
    ld = (u_base, dt_base, z_base, BC_base, r_base, Wdt)
    st = (s_u_l, s_dt_l, s_z_l)
    if DEPTH == 2:  # the split forward's writing loop over the whole sequence (see _segment_scan)
        h, _ = _segment_scan(h, A2, Dv, dbv, *ld, *st, 0, L, L, o_base, s_o_l, hs_base, rn, rd, dmask, DIM, HAS_D,
                             HAS_DB, HAS_Z, SOFTPLUS, ROUTED, ACCUM, SAVE_STATES, T, BD, NP, FAST, PREFETCH, PIN,
                             DTRP, True, out_dtype)  # fmt: skip
    else:  # DEPTH 4: three steps' inputs in flight while one computes
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
                    _store_once(hs_base + (t // T) * NP * DIM + _state_offsets(rn, rd, DIM, PIN), h, dmask[None, :])
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
        tl.store(
            last_ptr + (pid_r * BATCH + pid_b) * NP * DIM + _state_offsets(rn, rd, DIM, PIN), h, mask=dmask[None, :]
        )


@triton.jit
def _segment_program(NSEG):
    # split-L grids: axis 2 is route * NSEG + segment
    return (tl.program_id(2) // NSEG).to(tl.int64), tl.program_id(2) % NSEG


@triton.jit
def _store_segment(rec_ptr, dtsum_ptr, rec, x, dts, rn, rd, dmask, DIM, NP: tl.constexpr, PIN: tl.constexpr):
    # a segment's record: its (NP, BD) end value x (state or handed-back adjoint) and its delta sum
    tl.store(rec_ptr + rec * NP * DIM + _state_offsets(rn, rd, DIM, PIN), x, mask=dmask[None, :])
    tl.store(dtsum_ptr + rec * DIM + rd, dts, mask=dmask)


@triton.jit
def _fold_segment(x, rec_ptr, dtsum_ptr, rec, A2, rn, rd, dmask, DIM, NP: tl.constexpr, PIN: tl.constexpr):
    # carry x across segment rec: decayed by its total decay exp(A * its delta sum), plus its own end value
    dsum = tl.load(dtsum_ptr + rec * DIM + rd, mask=dmask, other=0.0)
    xk = tl.load(rec_ptr + rec * NP * DIM + _state_offsets(rn, rd, DIM, PIN), mask=dmask[None, :], other=0.0)
    return tl.exp2(dsum[None, :] * A2) * x + xk


@triton.jit
def _segment_scan(h, A2, Dv, dbv, u_base, dt_base, z_base, BC_base, r_base, Wdt, s_u_l, s_dt_l, s_z_l,
                  t0, t1, L, o_base, s_o_l, hs_base, rn, rd, dmask, DIM,
                  HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                  ROUTED: tl.constexpr, ACCUM: tl.constexpr, SAVE_STATES: tl.constexpr, T: tl.constexpr,
                  BD: tl.constexpr, NP: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr, PIN: tl.constexpr,
                  DTRP: tl.constexpr, WRITE: tl.constexpr, out_dtype: tl.constexpr):  # fmt: skip
    # steps t0 .. t1 - 1 of a split program from state h: WRITE, writing y (and the saved chunk states) exactly as
    # the one-step forward does; else only the state and the sum of the deltas (returned; 0 when WRITE)
    dts = tl.zeros((BD,), dtype=tl.float32)
    ld = (u_base, dt_base, z_base, BC_base, r_base, Wdt)
    st = (s_u_l, s_dt_l, s_z_l)
    b0 = _fwd_load(*ld, t0, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
    for t in range(t0, t1, 2):  # t0 (0 or a segment start) a multiple of T, T of 2: saved steps come first in a pair
        b1 = _fwd_load(*ld, t + 1, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        if PREFETCH > 0:
            _fwd_prefetch(*ld, t + PREFETCH, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
            _fwd_prefetch(*ld, t + PREFETCH + 1, L, *st, dmask, ROUTED, HAS_Z, NP, DTRP)
        if WRITE:
            if SAVE_STATES:
                if t % T == 0:
                    _store_once(hs_base + (t // T) * NP * DIM + _state_offsets(rn, rd, DIM, PIN), h, dmask[None, :])
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
    SEG: tl.constexpr, FINAL: tl.constexpr, PIN: tl.constexpr, DTRP: tl.constexpr,
):  # fmt: skip
    # L split into NSEG >= 2 segments of SEG steps, one program per (channel block, batch, route, segment): about
    # NSEG times the programs of the one-step forward, for grids that have too few (long L, small batch). Two
    # launches, each over NSEG - 1 segments (grid axis 2: route * (NSEG - 1) + its program):
    # FINAL False, segments 0 .. NSEG - 2: each segment's scan from a zero state; stores its end state and the sum
    #   of its deltas (its total decay is exp(A * that sum)). Segment 0 starts from the true (zero) state, so it
    #   writes its output here, as the second launch would. The last segment's end state is never needed.
    # FINAL True, segments 1 .. NSEG - 1: each segment's start state from the earlier segments' pairs,
    #   h = exp(A sum_k) h + hend_k for k < s (NSEG is small), then the segment again from that state, writing y
    #   (and the saved chunk states) exactly as the one-step forward does.
    # Twice the exponentials of the one-step forward, less two segments' worth (vim_tiny at 1248: 24 segments).
    # The small-grid default ("auto", L > SEG).
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r, seg = _segment_program(NSEG - 1)
    seg += FINAL
    rd, rn, dmask, A2, Dv, dbv = _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D, HAS_DB, BD, NP, PIN)
    u_base = u_ptr + pid_r * s_u_r + pid_b * s_u_b + rd * s_u_d
    dt_base, Wdt = _delta_source(dt_ptr, wdt_ptr, pid_r, pid_b, rd, dmask, A2, DIM, s_dt_r, s_dt_b, s_dt_d, PIN, DTRP)
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
            h = _fold_segment(h, hend_ptr, dtsum_ptr, rb + k, A2, rn, rd, dmask, DIM, NP, PIN)
        h, _ = _segment_scan(h, A2, Dv, dbv, *ld, t0, t1, L, *where, HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ROUTED, ACCUM,
                             SAVE_STATES, T, BD, NP, FAST, PREFETCH, PIN, DTRP, True, out_dtype)  # fmt: skip
        if SAVE_LAST:
            if seg == NSEG - 1:
                tl.store(
                    last_ptr + (pid_r * BATCH + pid_b) * NP * DIM + _state_offsets(rn, rd, DIM, PIN), h,
                    mask=dmask[None, :],
                )  # fmt: skip
    else:
        if seg == 0:  # its delta sum is never read: the fold starts from a zero state
            h, dts = _segment_scan(h, A2, Dv, dbv, *ld, t0, t1, L, *where, HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ROUTED,
                                   ACCUM, SAVE_STATES, T, BD, NP, FAST, PREFETCH, PIN, DTRP, True, out_dtype)  # fmt: skip
        else:
            h, dts = _segment_scan(h, A2, Dv, dbv, *ld, t0, t1, L, *where, HAS_D, HAS_DB, HAS_Z, SOFTPLUS, ROUTED,
                                   ACCUM, SAVE_STATES, T, BD, NP, FAST, PREFETCH, PIN, DTRP, False, out_dtype)  # fmt: skip
        _store_segment(hend_ptr, dtsum_ptr, rb + seg, h, dts, rn, rd, dmask, DIM, NP, PIN)


@triton.jit
def _xor_lanes(x, lane, m: tl.constexpr):
    # x[:, j] <- x[:, j ^ m] along the channel axis: with one channel per lane, a butterfly shuffle on the GPU
    return tl.gather(x, tl.broadcast_to((lane ^ m)[None, :], x.shape), 1)


@triton.jit
def _halves(x, H: tl.constexpr, BD: tl.constexpr):
    # (2H, BD) -> rows [0, H), rows [H, 2H); in-thread rows, so no data moves
    return tl.split(tl.permute(tl.reshape(x, (2, H, BD)), (1, 2, 0)))


@triton.jit
def _lane_sum(x, lane, NP: tl.constexpr, LOG2NP: tl.constexpr, BD: tl.constexpr):
    """Sum an (NP, BD = 32) tile over its 32 channels, one channel per lane, as a reduce-scatter: lane j ends
    with the sum of row (j >> (5 - LOG2NP)) & (NP - 1). Each round halves the rows a lane keeps and swaps the
    other half with the lane m apart (m = 16, 8, ...); for NP 16 that is 8 + 4 + 2 + 1 exchanges and one more to
    pair lanes up: 16 shuffles for 16 sums, where a butterfly per row costs 16 x 5."""
    for r in tl.static_range(LOG2NP):
        lo, hi = _halves(x, NP >> (r + 1), BD)
        b = ((lane >> (4 - r)) & 1)[None, :] == 1
        x = tl.where(b, hi, lo) + _xor_lanes(tl.where(b, lo, hi), lane, 16 >> r)
    for r in tl.static_range(LOG2NP, 5):
        x = x + _xor_lanes(x, lane, 16 >> r)
    return tl.reshape(x, (BD,))


@triton.jit
def _add_over_channels(ptr, x, lane, rn, live, LANE_SUM: tl.constexpr, NP: tl.constexpr, LOG2NP: tl.constexpr,
                       BD: tl.constexpr):  # fmt: skip
    # ptr[n] += sum over this program's channels of x[n, :] (x: (NP, BD)); relaxed atomics (no fences). (Per-block
    # partial sums written without atomics and summed afterwards measured the same on an H100: no contention.)
    if LANE_SUM:
        v = _lane_sum(x, lane, NP, LOG2NP, BD)
        shift: tl.constexpr = 5 - LOG2NP
        writer = (lane & ((1 << shift) - 1)) == 0
        tl.atomic_add(ptr + ((lane >> shift) & (NP - 1)), v, mask=writer & live, sem="relaxed")
    else:
        tl.atomic_add(ptr + rn, tl.sum(x, axis=1), mask=live, sem="relaxed")


@triton.jit
def _scan_bwd_split_prep_kernel(
    dt_ptr, A_ptr, BC_ptr, db_ptr, z_ptr, dout_ptr, route_ptr, gout_ptr, dtsum_ptr,
    L, DIM, BATCH, NSEG,
    s_dt_r, s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_do_r, s_do_b, s_do_l, s_do_d,
    HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, ROUTED: tl.constexpr,
    BD: tl.constexpr, NP: tl.constexpr, FAST: tl.constexpr, SEG: tl.constexpr, PIN: tl.constexpr,
):  # fmt: skip
    # Split-L backward, first launch (the small-grid default): each segment's adjoint walked last step to
    # first from zero, g_t = C_t dy_t + a_{t+1} g_{t+1}; stores what it hands to the earlier segment, a_t0 g_t0,
    # and its delta sum (its total decay is exp(A * that sum)). dy needs dout and z only, not the states.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r, seg = _segment_program(NSEG)
    rd, rn, dmask, A2, _, dbv = _channel_block(A_ptr, A_ptr, db_ptr, pid_d, pid_r, DIM, False, HAS_DB, BD, NP, PIN)
    dt_base = dt_ptr + pid_r * s_dt_r + pid_b * s_dt_b + rd * s_dt_d
    do_base = dout_ptr + pid_r * s_do_r + pid_b * s_do_b + rd * s_do_d
    z_base = z_ptr + pid_b * s_z_b + rd * s_z_d
    BC_base = BC_ptr + (pid_r * BATCH + pid_b) * L * (2 * NP)
    r_base = route_ptr + pid_r * L
    t0 = seg * SEG
    t1 = tl.minimum(t0 + SEG, L)
    gnext = tl.zeros((NP, BD), dtype=tl.float32)
    dts = tl.zeros((BD,), dtype=tl.float32)
    for i in range(0, t1 - t0):
        t = t1 - 1 - i
        tok = _step_token(r_base, t, L, ROUTED)
        dt = _step_delta(tl.load(dt_base + tok * s_dt_l, mask=dmask, other=0.0), dbv, t < L, HAS_DB, SOFTPLUS, FAST)
        dy = tl.load(do_base + tok * s_do_l, mask=dmask, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_base + tok * s_z_l, mask=dmask, other=0.0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
        Ct = tl.load(BC_base + tok * (2 * NP) + NP + tl.arange(0, NP))
        gnext = tl.exp2(dt[None, :] * A2) * (Ct[:, None] * dy[None, :] + gnext)
        dts += dt
    _store_segment(gout_ptr, dtsum_ptr, (pid_r * BATCH + pid_b) * NSEG + seg, gnext, dts, rn, rd, dmask, DIM, NP, PIN)


@triton.jit
def _recompute_step(h, A2, dbv, t, u_base, dt_base, BC_base, r_base, L, s_u_l, s_dt_l, dmask,
                    ROUTED: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
                    NP: tl.constexpr):  # fmt: skip
    # the state one step on (no output): the backward's recomputation of a sub-chunk's start state. The delta is
    # formed inline, not by _step_delta, whose `live` argument would move the `t < L` test ahead of the softplus and
    # change the compiled order of the timed kernels.
    tok = _step_token(r_base, t, L, ROUTED)
    u = tl.load(u_base + tok * s_u_l, mask=dmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_base + tok * s_dt_l, mask=dmask, other=0.0).to(tl.float32)
    Bt = tl.load(BC_base + tok * (2 * NP) + tl.arange(0, NP))
    if HAS_DB:
        dt = dt + dbv
    if SOFTPLUS:
        dt, _ = _softplus_fast(dt, FAST)
    dt = tl.where(t < L, dt, 0.0)
    return tl.exp2(dt[None, :] * A2) * h + Bt[:, None] * (dt * u)[None, :]


@triton.jit
def _pick(X, rk2, k: tl.constexpr):
    # row k of a tile whose first axis is in-thread: the select folds away (k is static), and so does the
    # reduction, an OR of the bits with zeros (a sum would keep one x + 0.0 per pick: not x when x is -0.0)
    bits = tl.where(rk2 == k, X.to(tl.int32, bitcast=True), 0)
    return tl.reduce_or(bits, 0).to(tl.float32, bitcast=True)


@triton.jit
def _visit_start(v, c_hi, T: tl.constexpr, S: tl.constexpr, SUBS: tl.constexpr):
    # the first step of the backward's v-th sub-chunk visit (chunks last to first, a chunk's sub-chunks last first)
    return (c_hi - 1 - v // SUBS) * T + (SUBS - 1 - v % SUBS) * S


@triton.jit
def _bwd_rows(t0, u_base, dt_base, do_base, z_base, r_base, L, s_u_l, s_dt_l, s_do_l, s_z_l, dmask,
              S: tl.constexpr, ROUTED: tl.constexpr, HAS_Z: tl.constexpr):  # fmt: skip
    # the per-channel rows (u, delta, dout, z) of steps t0 .. t0 + S - 1 as (S, BD) fp32 tiles, S in-thread. t0 is
    # clamped at 0: a pipelined load past the first chunk reads rows that are never used.
    tok = _step_token(r_base, tl.maximum(t0, 0) + tl.arange(0, S), L, ROUTED)
    m = dmask[None, :]
    U = _load_once(_row_ptrs(u_base, tok, s_u_l), m).to(tl.float32)
    DT = _load_once(_row_ptrs(dt_base, tok, s_dt_l), m).to(tl.float32)
    DO = _load_once(_row_ptrs(do_base, tok, s_do_l), m).to(tl.float32)
    Z = U
    if HAS_Z:
        Z = _load_once(_row_ptrs(z_base, tok, s_z_l), m).to(tl.float32)
    return U, DT, DO, Z


@triton.jit
def _row_ptrs(base, tok, s_l):
    # (S, BD) pointers to S rows. Hinted unaligned like the state tiles (_state_offsets): else Triton vectorises
    # the load along the channels and the (S, BD) tiles, and the loop after them, leave one channel per lane.
    return tl.multiple_of(base[None, :] + (tok * s_l)[:, None], [1, 1])


@triton.jit
def _scan_bwd_seq_kernel(
    u_ptr, dt_ptr, A_ptr, BC_ptr, D_ptr, db_ptr, z_ptr, dout_ptr, hs_ptr, route_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dBC_ptr, dD_ptr, ddb_ptr, gout_ptr, dtsum_ptr,
    L, DIM, NCHUNK, BATCH, NSEG,
    s_u_r, s_u_b, s_u_l, s_u_d,
    s_dt_r, s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_do_r, s_do_b, s_do_l, s_do_d,
    s_du_r, s_du_b, s_du_l, s_du_d,
    s_ddt_r, s_ddt_b, s_ddt_l, s_ddt_d,
    s_dz_b, s_dz_l, s_dz_d,
    HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ROUTED: tl.constexpr, T: tl.constexpr, SUBS: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
    LANE_SUM: tl.constexpr, LOG2NP: tl.constexpr, FAST: tl.constexpr, SEGC: tl.constexpr, PIN: tl.constexpr,
    FLAT: tl.constexpr, AHEAD: tl.constexpr,
):  # fmt: skip
    # Same layout as the one-step forward: tiles (NP, BD), a channel's states in one thread. The saved chunks of T
    # steps are walked last to first, each in SUBS sub-chunks of S = T / SUBS steps (last first): the sub-chunk's
    # start state is recomputed from the chunk's saved one (a plain walk, no history kept), then
    # phase 1 walks the S steps forward and forms y, dz, dy and dC (which need only h_t), keeping each step's
    # decayed previous state a_t h_{t-1} in an (S, NP, BD) register tile (unrolled, the S axis in-thread, so the
    # selects on it fold away: _pick);
    # phase 2 walks them backward with one FMA of loop-carried dependency, g_t = C_t dy_t + a_{t+1} g_{t+1}, and
    # forms du, ddelta, dA, dB from g_t and that tile. (Keeping h_t instead and forming a_t h_{t-1} as
    # h_t - B_t dt_t u_t costs one more FMA per state and step: H100, (128, 768, 197), fwd+bwd GPU time 1.055 vs
    # 1.048-1.050 ms.)
    # Sub-chunks trade a little recomputation for fewer registers (sm_90 ptxas: S 4 ~250 registers, small or no
    # spills; S 8 spills hundreds of bytes) while the saved states stay one per T steps. dB, dC (sums over
    # channels) are reduced across lanes by _lane_sum and added with relaxed atomics.
    # FLAT: the dynamic loop takes one sub-chunk per iteration instead of a chunk's SUBS unrolled ones, so T 8
    # compiles like T 4 and takes the register cap too (H100, (128, 768, 197), T 8: fwd+bwd 1.59 -> 1.31-1.36 ms).
    # AHEAD: where the per-channel rows (u, delta, dout, z) are loaded. 0: each step's at the step, which waits on
    # them: the stores and atomics of the step before keep the compiler from issuing them earlier (they might
    # alias); 1 (default): a sub-chunk's S rows at its start, one wait per sub-chunk (H100, (128, 768, 197), T 4:
    # fwd+bwd 1.26 -> 1.16 ms); 2: the next sub-chunk's rows during this one (16 more live registers: spills, no
    # gain); 3: as 1, and the next sub-chunk's rows and saved state prefetched into L2 (no gain).
    # SEGC > 0 (split L, the small-grid default): one program per segment of SEGC chunks, NSEG of them; its
    # incoming a g from the later segments is folded from _scan_bwd_split_prep_kernel's records, then its chunks run
    # as above.
    S: tl.constexpr = T // SUBS
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    if SEGC > 0:
        pid_r, seg = _segment_program(NSEG)
        c_lo = seg * SEGC
        c_hi = tl.minimum(c_lo + SEGC, NCHUNK)
    else:
        pid_r = tl.program_id(2).to(tl.int64)
        c_lo = 0
        c_hi = NCHUNK
    rd, rn, dmask, A2, Dv, dbv = _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D, HAS_DB, BD, NP, PIN)
    lane = tl.arange(0, BD) % 32
    rk3 = tl.arange(0, S)[:, None, None]
    rk2 = tl.arange(0, S)[:, None]
    u_base = u_ptr + pid_r * s_u_r + pid_b * s_u_b + rd * s_u_d
    dt_base = dt_ptr + pid_r * s_dt_r + pid_b * s_dt_b + rd * s_dt_d
    do_base = dout_ptr + pid_r * s_do_r + pid_b * s_do_b + rd * s_do_d
    z_base = z_ptr + pid_b * s_z_b + rd * s_z_d
    du_base = du_ptr + pid_r * s_du_r + pid_b * s_du_b + rd * s_du_d
    ddt_base = ddt_ptr + pid_r * s_ddt_r + pid_b * s_ddt_b + rd * s_ddt_d
    dz_base = dz_ptr + pid_b * s_dz_b + rd * s_dz_d
    BC_base = BC_ptr + (pid_r * BATCH + pid_b) * L * (2 * NP)  # scalar; + rn at each load
    dBC_base = dBC_ptr + (pid_r * BATCH + pid_b) * L * (2 * NP)
    r_base = route_ptr + pid_r * L
    # a scalar base: an (NP, BD) tile of pointers kept across the loop would hold 2 registers per element
    hs_base = hs_ptr + (pid_r * BATCH + pid_b) * NCHUNK * NP * DIM
    gnext = tl.zeros((NP, BD), dtype=tl.float32)  # a_{t+1} g_{t+1}, handed from the later step/chunk
    if SEGC > 0:
        rb = (pid_r * BATCH + pid_b) * NSEG
        for i in range(0, NSEG - 1 - seg):  # later segments, last first: G = P_k G + (a g handed out by k alone)
            gnext = _fold_segment(gnext, gout_ptr, dtsum_ptr, rb + NSEG - 1 - i, A2, rn, rd, dmask, DIM, NP, PIN)
    dA_acc = tl.zeros((NP, BD), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    ddb_acc = tl.zeros((BD,), dtype=tl.float32)
    # FLAT: one sub-chunk per iteration of the dynamic loop (j dynamic, the recompute a loop), so the unrolled body
    # holds one sub-chunk whatever SUBS is; else a chunk's SUBS sub-chunks are unrolled into one iteration
    # (tb: the first step of the iteration's sub-chunks, j: the sub-chunk within them)
    NJ: tl.constexpr = 1 if FLAT else SUBS
    rows = (u_base, dt_base, do_base, z_base, r_base, L, s_u_l, s_dt_l, s_do_l, s_z_l, dmask)
    if AHEAD == 2:
        nU, nDT, nDO, nZ = _bwd_rows(_visit_start(0, c_hi, T, S, SUBS), *rows, S, ROUTED, HAS_Z)
    for it in range((c_hi - c_lo) * (SUBS // NJ)):
        c = c_hi - 1 - it // (SUBS // NJ)
        if FLAT:
            tb = c * T + (SUBS - 1 - it % SUBS) * S
        for j in tl.static_range(NJ - 1, -1, -1):
            # AHEAD 1: the sub-chunk's rows loaded at its start; 2: the next visit's rows loaded now, used next;
            # 3: as 1, and the next visit's rows and saved state prefetched into L2
            if AHEAD == 1 or AHEAD == 3:
                cU, cDT, cDO, cZ = _bwd_rows((tb if FLAT else c * T) + j * S, *rows, S, ROUTED, HAS_Z)
            if AHEAD == 3:
                vn = it * NJ + NJ - j  # the next visit
                _l2_prefetch(hs_base + tl.maximum(c_hi - 1 - vn // SUBS, 0) * NP * DIM
                             + _state_offsets(rn, rd, DIM, PIN), dmask[None, :])  # fmt: skip
                tn = tl.maximum(_visit_start(vn, c_hi, T, S, SUBS), 0) + tl.arange(0, S)
                tokn = _step_token(r_base, tn, L, ROUTED)
                _l2_prefetch(_row_ptrs(u_base, tokn, s_u_l), dmask[None, :])
                _l2_prefetch(_row_ptrs(dt_base, tokn, s_dt_l), dmask[None, :])
                _l2_prefetch(_row_ptrs(do_base, tokn, s_do_l), dmask[None, :])
                if HAS_Z:
                    _l2_prefetch(_row_ptrs(z_base, tokn, s_z_l), dmask[None, :])
            if AHEAD == 2:
                cU, cDT, cDO, cZ = nU, nDT, nDO, nZ
                nU, nDT, nDO, nZ = _bwd_rows(_visit_start(it * NJ + NJ - j, c_hi, T, S, SUBS), *rows, S, ROUTED, HAS_Z)
            h = _load_once(hs_base + c * NP * DIM + _state_offsets(rn, rd, DIM, PIN), dmask[None, :])
            # ---- recompute the sub-chunk's start state
            ld = (u_base, dt_base, BC_base, r_base, L, s_u_l, s_dt_l, dmask)
            if FLAT:
                for k in range(tb - c * T):
                    h = _recompute_step(h, A2, dbv, c * T + k, *ld, ROUTED, HAS_DB, SOFTPLUS, FAST, NP)
            else:
                for k in tl.static_range(j * S):
                    h = _recompute_step(h, A2, dbv, c * T + k, *ld, ROUTED, HAS_DB, SOFTPLUS, FAST, NP)
            AHs = tl.zeros((S, NP, BD), dtype=tl.float32)
            Us = tl.zeros((S, BD), dtype=tl.float32)
            DTs = tl.zeros((S, BD), dtype=tl.float32)
            DYs = tl.zeros((S, BD), dtype=tl.float32)
            SPs = tl.zeros((S, BD), dtype=tl.float32)
            # ---- phase 1: forward through the sub-chunk
            for k in tl.static_range(S):
                t = (tb if FLAT else c * T) + j * S + k
                live = t < L
                tok = _step_token(r_base, t, L, ROUTED)
                m1 = dmask & live
                if AHEAD > 0:
                    u, dt_raw, dout = _pick(cU, rk2, k), _pick(cDT, rk2, k), _pick(cDO, rk2, k)
                else:
                    u = tl.load(u_base + tok * s_u_l, mask=dmask, other=0.0).to(tl.float32)
                    dt_raw = tl.load(dt_base + tok * s_dt_l, mask=dmask, other=0.0).to(tl.float32)
                    dout = tl.load(do_base + tok * s_do_l, mask=dmask, other=0.0).to(tl.float32)
                Bt = tl.load(BC_base + tok * (2 * NP) + tl.arange(0, NP))
                Ct = tl.load(BC_base + tok * (2 * NP) + NP + tl.arange(0, NP))
                if HAS_DB:
                    dt_raw = dt_raw + dbv
                if SOFTPLUS:
                    dt, sp = _softplus_fast(dt_raw, FAST)
                    SPs = tl.where(rk2 == k, sp[None, :], SPs)
                else:
                    dt = dt_raw
                dt = tl.where(live, dt, 0.0)
                dout = tl.where(live, dout, 0.0)
                ah = tl.exp2(dt[None, :] * A2) * h  # a_t h_{t-1}: what phase 2 needs of the states
                h = ah + Bt[:, None] * (dt * u)[None, :]
                AHs = tl.where(rk3 == k, ah[None, :, :], AHs)
                if HAS_Z:
                    y = tl.sum(h * Ct[:, None], axis=0)
                    if HAS_D:
                        y = y + u * Dv
                    if AHEAD > 0:
                        zv = _pick(cZ, rk2, k)
                    else:
                        zv = tl.load(z_base + tok * s_z_l, mask=dmask, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(zv)
                    dy = dout * zv * sz
                    dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
                    _store_once(dz_base + tok * s_dz_l, dz.to(dz_ptr.dtype.element_ty), m1)
                else:
                    dy = dout
                if HAS_D:
                    dD_acc += dy * u
                _add_over_channels(
                    dBC_base + tok * (2 * NP) + NP, h * dy[None, :], lane, rn, live, LANE_SUM, NP, LOG2NP, BD
                )
                Us = tl.where(rk2 == k, u[None, :], Us)
                DTs = tl.where(rk2 == k, dt[None, :], DTs)
                DYs = tl.where(rk2 == k, dy[None, :], DYs)
            # ---- phase 2: backward through the sub-chunk
            for k in tl.static_range(S - 1, -1, -1):
                t = (tb if FLAT else c * T) + j * S + k
                live = t < L
                tok = _step_token(r_base, t, L, ROUTED)
                m1 = dmask & live
                Bt = tl.load(BC_base + tok * (2 * NP) + tl.arange(0, NP))
                Ct = tl.load(BC_base + tok * (2 * NP) + NP + tl.arange(0, NP))
                u, dt, dy = _pick(Us, rk2, k), _pick(DTs, rk2, k), _pick(DYs, rk2, k)
                # recomputed, not kept from phase 1 (64 more live registers: spills). fma(.., 0.0), not a product:
                # dt is phase 1's bit for bit, and the compiler would merge the two exp2 and keep the results
                a = tl.exp2(tl.fma(dt[None, :], A2, 0.0))
                dtu = dt * u
                ah = _pick(AHs, rk3, k)  # a_t h_{t-1}
                g = Ct[:, None] * dy[None, :] + gnext
                gnext = a * g
                gB = tl.sum(g * Bt[:, None], axis=0)
                gah = g * ah
                du = dt * gB
                if HAS_D:
                    du = du + dy * Dv
                ddt = u * gB + tl.sum(gah * A2, axis=0) * 0.6931471805599453  # A = A2 ln 2
                if SOFTPLUS:
                    ddt = ddt * _pick(SPs, rk2, k)
                ddt = tl.where(live, ddt, 0.0)
                if HAS_DB:
                    ddb_acc += ddt
                dA_acc += gah * dt[None, :]
                _add_over_channels(
                    dBC_base + tok * (2 * NP), g * dtu[None, :], lane, rn, live, LANE_SUM, NP, LOG2NP, BD
                )
                _store_once(du_base + tok * s_du_l, du.to(du_ptr.dtype.element_ty), m1)
                _store_once(ddt_base + tok * s_ddt_l, ddt.to(ddt_ptr.dtype.element_ty), m1)
    tl.atomic_add(
        dA_ptr + pid_r * NP * DIM + _state_offsets(rn, rd, DIM, PIN), dA_acc, mask=dmask[None, :], sem="relaxed"
    )
    if HAS_D:
        tl.atomic_add(dD_ptr + pid_r * DIM + rd, dD_acc, mask=dmask, sem="relaxed")
    if HAS_DB:
        tl.atomic_add(ddb_ptr + pid_r * DIM + rd, ddb_acc, mask=dmask, sem="relaxed")


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, db_ptr, z_ptr, dout_ptr, hs_ptr, route_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddb_ptr,
    L, DIM, N, NCHUNK, BATCH,
    s_u_r, s_u_b, s_u_l, s_u_d,
    s_dt_r, s_dt_b, s_dt_l, s_dt_d,
    s_B_r, s_B_b, s_B_l, s_B_n,
    s_C_r, s_C_b, s_C_l, s_C_n,
    s_z_b, s_z_l, s_z_d,
    s_do_r, s_do_b, s_do_l, s_do_d,
    s_du_r, s_du_b, s_du_l, s_du_d,
    s_ddt_r, s_ddt_b, s_ddt_l, s_ddt_d,
    s_dz_b, s_dz_l, s_dz_d,
    HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ROUTED: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    rk = tl.arange(0, T)
    dmask = rd < DIM
    nmask = rn < N
    A2 = tl.load(A_ptr + pid_r * NP * DIM + rn[None, :] * DIM + rd[:, None], mask=dmask[:, None], other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    if HAS_DB:
        dbv = tl.load(db_ptr + pid_r * DIM + rd, mask=dmask, other=0.0)
    u_base = u_ptr + pid_r * s_u_r + pid_b * s_u_b
    dt_base = dt_ptr + pid_r * s_dt_r + pid_b * s_dt_b
    B_base = B_ptr + pid_r * s_B_r + pid_b * s_B_b
    C_base = C_ptr + pid_r * s_C_r + pid_b * s_C_b
    do_base = dout_ptr + pid_r * s_do_r + pid_b * s_do_b
    du_base = du_ptr + pid_r * s_du_r + pid_b * s_du_b
    ddt_base = ddt_ptr + pid_r * s_ddt_r + pid_b * s_ddt_b
    # dB, dC: fp32 (R, batch, L, 2 NP) (dB then dC), summed over channel blocks with atomics; dC_ptr = dB_ptr + NP
    dBC_off = (pid_r * BATCH + pid_b) * L * (2 * NP)
    hs_base = hs_ptr + (pid_r * BATCH + pid_b) * NCHUNK * DIM * NP
    first = (rk == 0)[:, None, None]
    last = (rk == T - 1)[:, None, None]
    ones = tl.full((T, BD, NP), 1.0, tl.float32)
    g_in = tl.zeros((BD, NP), dtype=tl.float32)  # a_{t+1} g_{t+1} handed back from the later chunk
    dA_acc = tl.zeros((BD, NP), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    ddb_acc = tl.zeros((BD,), dtype=tl.float32)
    for ci in range(NCHUNK):
        c = NCHUNK - 1 - ci
        t = c * T + rk
        tmask = t < L
        if ROUTED:
            tok = tl.load(route_ptr + pid_r * L + t, mask=tmask, other=0)
        else:
            tok = t.to(tl.int64)
        m2 = tmask[:, None] & dmask[None, :]
        mn = tmask[:, None] & nmask[None, :]
        if PREFETCH:  # the previous chunk's rows into L2 while this one computes
            tp = tl.maximum(c - 1, 0) * T + rk
            tokp = tl.load(route_ptr + pid_r * L + tp, mask=tp < L, other=0) if ROUTED else tp.to(tl.int64)
            mp = (tp < L)[:, None] & dmask[None, :]
            _l2_prefetch(u_base + tokp[:, None] * s_u_l + rd[None, :] * s_u_d, mp)
            _l2_prefetch(dt_base + tokp[:, None] * s_dt_l + rd[None, :] * s_dt_d, mp)
            _l2_prefetch(do_base + tokp[:, None] * s_do_l + rd[None, :] * s_do_d, mp)
            if HAS_Z:
                _l2_prefetch(z_ptr + pid_b * s_z_b + tokp[:, None] * s_z_l + rd[None, :] * s_z_d, mp)
        u = tl.load(u_base + tok[:, None] * s_u_l + rd[None, :] * s_u_d, mask=m2, other=0.0).to(tl.float32)
        dt_raw = tl.load(dt_base + tok[:, None] * s_dt_l + rd[None, :] * s_dt_d, mask=m2, other=0.0).to(tl.float32)
        if HAS_DB:
            dt_raw = dt_raw + dbv[None, :]
        if SOFTPLUS:
            dt = _softplus(dt_raw)
        else:
            dt = dt_raw
        dt = tl.where(m2, dt, 0.0)
        Bt = tl.load(B_base + tok[:, None] * s_B_l + rn[None, :] * s_B_n, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_base + tok[:, None] * s_C_l + rn[None, :] * s_C_n, mask=mn, other=0.0).to(tl.float32)
        dout = tl.load(do_base + tok[:, None] * s_do_l + rd[None, :] * s_do_d, mask=m2, other=0.0).to(tl.float32)
        h0 = tl.load(hs_base + c * NP * DIM + rn[None, :] * DIM + rd[:, None], mask=dmask[:, None], other=0.0)
        # recompute the chunk's states from its saved start state
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])
        xo = (dt * u)[:, :, None] * Bt[:, None, :]
        x = xo + tl.where(first, a * h0[None, :, :], 0.0)
        _, hh = tl.associative_scan((a, x), 0, _comb_fwd)
        if HAS_Z:
            y = tl.sum(hh * Ct[:, None, :], axis=2)
            if HAS_D:
                y = y + u * Dv[None, :]
            zv = tl.load(z_ptr + pid_b * s_z_b + tok[:, None] * s_z_l + rd[None, :] * s_z_d, mask=m2, other=0.0)
            zv = zv.to(tl.float32)
            sz = tl.sigmoid(zv)
            dy = dout * zv * sz
            dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
            tl.store(
                dz_ptr + pid_b * s_dz_b + tok[:, None] * s_dz_l + rd[None, :] * s_dz_d,
                dz.to(dz_ptr.dtype.element_ty),
                mask=m2,
            )
        else:
            dy = dout
        # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: reverse scan, the later chunk's term folded into the last step
        cdy = Ct[:, None, :] * dy[:, :, None]
        cdy = cdy + tl.where(last, g_in[None, :, :], 0.0)
        _, _, g = tl.associative_scan((a, ones, cdy), 0, _comb_bwd, reverse=True)
        g_in = tl.sum(tl.where(first, a * g, 0.0), axis=0)
        gah = g * (hh - xo)  # g_t * a_t h_{t-1}
        gB = tl.sum(g * Bt[:, None, :], axis=2)
        du = dt * gB
        if HAS_D:
            du = du + dy * Dv[None, :]
            dD_acc += tl.sum(dy * u, axis=0)
        ddt = u * gB + tl.sum(gah * A2[None, :, :], axis=2) * 0.6931471805599453  # A = A2 ln 2
        if SOFTPLUS:
            ddt = tl.where(dt_raw <= 20.0, ddt * tl.sigmoid(dt_raw), ddt)
        ddt = tl.where(m2, ddt, 0.0)
        if HAS_DB:
            ddb_acc += tl.sum(ddt, axis=0)
        dA_acc += tl.sum(gah * dt[:, :, None], axis=0)
        dB = tl.sum(g * (dt * u)[:, :, None], axis=1)
        dC = tl.sum(hh * dy[:, :, None], axis=1)
        bc_ptrs = dBC_off + tok[:, None] * (2 * NP) + rn[None, :]
        tl.atomic_add(dB_ptr + bc_ptrs, dB, mask=mn, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_ptrs, dC, mask=mn, sem="relaxed")
        tl.store(du_base + tok[:, None] * s_du_l + rd[None, :] * s_du_d, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_base + tok[:, None] * s_ddt_l + rd[None, :] * s_ddt_d, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    tl.atomic_add(
        dA_ptr + pid_r * NP * DIM + rn[None, :] * DIM + rd[:, None], dA_acc, mask=dmask[:, None], sem="relaxed"
    )
    if HAS_D:
        tl.atomic_add(dD_ptr + pid_r * DIM + rd, dD_acc, mask=dmask, sem="relaxed")
    if HAS_DB:
        tl.atomic_add(ddb_ptr + pid_r * DIM + rd, ddb_acc, mask=dmask, sem="relaxed")


@triton.jit
def _merge_fwd_kernel(acc_ptr, z_ptr, out_ptr, n_elem, inv_r, HAS_Z: tl.constexpr, BLOCK: tl.constexpr):
    # out = (sum_r y_r) / R * silu(z); acc, z, out are contiguous (batch, L, dim)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elem
    y = tl.load(acc_ptr + offs, mask=m, other=0.0) * inv_r
    if HAS_Z:
        zv = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _merge_bwd_kernel(
    acc_ptr, z_ptr, dout_ptr, dy_ptr, dz_ptr, n_elem, inv_r, HAS_Z: tl.constexpr, BLOCK: tl.constexpr
):
    # dy (shared by every route) = dout * silu(z) / R;  dz = dout * ybar * silu'(z), ybar = acc / R
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elem
    do = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zv)
        ybar = tl.load(acc_ptr + offs, mask=m, other=0.0) * inv_r
        tl.store(dz_ptr + offs, (do * ybar * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m)
        do = do * zv * sz
    tl.store(dy_ptr + offs, do * inv_r, mask=m)


def _np(N: int) -> int:
    return max(2, triton.next_power_of_2(N))


def _opt(t, dtype=torch.float32):
    # a contiguous stand-in pointer for absent optional tensors (never read: the constexpr flag is off)
    return t.contiguous().to(dtype) if t is not None else None


def packed_row_offsets(N: int) -> tuple[int, int]:
    """Where C and dt_low start in a packed row [B | C | dt_low] (see _pack)."""
    return _np(N), 2 * _np(N)


def packed_projection_weight(weight, N: int, rank: int):
    """x_proj's weight (R, rank + 2 N, E), rows [dt | B | C] (Mamba's order), reordered and zero-padded to the scan's
    packed rows [B | C | dt_low] (see _pack): (R, 2 NP + _np(rank), E). x_proj with it writes the rows the
    forward-only scan reads, so they need no packing copy (vim_tiny at 1248: the copy took 1.0 ms of 51 a pass)."""
    R, _, E = weight.shape
    NP, P = _np(N), _np(rank)
    w = weight.new_zeros((R, 2 * NP + P, E))
    w[:, :N] = weight[:, rank : rank + N]
    w[:, NP : NP + N] = weight[:, rank + N :]
    w[:, 2 * NP : 2 * NP + rank] = weight[:, :rank]
    return w


def _packed_rows(B4, C4, dt_low, NP: int, P: int, dtype):
    # the (R, batch, L, 2 NP + P) tensor B, C and dt_low are views of when x_proj wrote them in the packed layout
    # (packed_projection_weight), else None. Only without state padding (N == NP): padded B / C columns would be
    # read as states. dt_low's padding meets zero rows of the packed dt_proj (_pack_dt_proj), so it adds nothing
    if dt_low is None or B4.shape[-1] != NP or any(t.dtype != dtype for t in (B4, C4, dt_low)):
        return None
    R, batch, L, _ = B4.shape
    row = 2 * NP + P
    strides = (batch * L * row, L * row, row, 1)
    e = B4.element_size()
    if any(t.stride() != strides for t in (B4, C4, dt_low)) or not (
        C4.data_ptr() == B4.data_ptr() + NP * e and dt_low.data_ptr() == B4.data_ptr() + 2 * NP * e
    ):
        return None
    return B4.as_strided((R, batch, L, row), strides)


def _pack(A3, B4, C4, dt_low=None, bc_dtype=torch.float32):
    """Kernel layouts of the small operands: A (R, dim, N) -> (R, NP, dim) float32 times log2(e) (exp(dt A) is then
    one exp2), zero-padded states; B, C (R, batch, L, N), any strides and dtype -> one float32 (R, batch, L, 2 NP)
    tensor [B | C]: a step's B and C rows are then two aligned 16-state vectors that every lane loads at once.
    With dt_low (R, batch, L, rank) (the fused dt_proj), the rows are [B | C | dt_low zero-padded to _np(rank)].
    bc_dtype: the rows' dtype (the forward-only entry keeps 16-bit inputs 16-bit: exact, half the bytes). Rows that
    x_proj already wrote in this layout (packed_projection_weight) are taken as they are."""
    R, dim, N = A3.shape
    NP = _np(N)
    _, batch, L, _ = B4.shape
    rank = dt_low.shape[-1] if dt_low is not None else 0
    P = _np(rank) if dt_low is not None else 0
    f32 = torch.float32
    if N == NP:  # one op each (the host's launches are a good part of a call at Vim's shapes)
        A2 = torch.mul(A3.transpose(1, 2), LOG2E, out=torch.empty((R, NP, dim), device=A3.device, dtype=f32))
        rows = _packed_rows(B4, C4, dt_low, NP, P, bc_dtype)
        if rows is not None:
            return A2, rows
        parts = (B4, C4)
        if dt_low is not None:
            parts += (dt_low,) + ((dt_low.new_zeros(()).expand(R, batch, L, P - rank),) if P > rank else ())
        BC = torch.cat(parts, -1, out=torch.empty((R, batch, L, 2 * NP + P), device=B4.device, dtype=bc_dtype))
        return A2, BC
    A2 = torch.zeros((R, NP, dim), device=A3.device, dtype=f32)
    A2[:, :N] = A3.transpose(1, 2) * LOG2E
    BC = torch.zeros((R, batch, L, 2 * NP + P), device=B4.device, dtype=bc_dtype)
    BC[..., :N] = B4
    BC[..., NP : NP + N] = C4
    if dt_low is not None:
        BC[..., 2 * NP : 2 * NP + rank] = dt_low
    return A2, BC


def _unpack_dBC(dBC, N: int, b_dtype, c_dtype):
    """dB, dC (R, batch, L, N) in B's and C's dtypes from the kernels' float32 [dB | dC] (one conversion for both)."""
    NP = dBC.shape[-1] // 2
    if b_dtype == c_dtype:
        dBC = dBC.to(b_dtype)
        return dBC[..., :N], dBC[..., NP : NP + N]
    return dBC[..., :N].to(b_dtype), dBC[..., NP : NP + N].to(c_dtype)


def _launch_opts(cfg: dict) -> dict:
    # maxnreg caps registers per thread (more warps resident, some spills): a per-kernel trade-off, measured
    opts = {"num_warps": cfg["num_warps"]}
    if cfg.get("maxnreg") and not _INTERPRET:
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


def _check_T(T: int) -> None:
    if T < 2 or T % 2:
        raise ValueError(f"vim_kernels: the chunk length T must be even and >= 2; got {T}")


def _launch_fwd(u4, dt4, A2, BC, D, db, z3, out4, routes, softplus, accum, save_last, save_states, batch, L, dim, R,
                wdt=None):  # fmt: skip
    # wdt: dt_proj packed by _pack_dt_proj; BC's rows then end with the low-rank rows (_pack) and dt4 is unused
    cfg = _fwd_config(batch, dim, R, L, A2.shape[1])
    T, BD = cfg["T"], cfg["BD"]
    _check_T(T)
    NP = A2.shape[1]
    nchunk = triton.cdiv(L, T)
    dev = u4.device
    hs = _empty((R, batch, nchunk, NP, dim), device=dev, dtype=torch.float32) if save_states else A2
    last = _empty((R * batch, NP, dim), device=dev, dtype=torch.float32) if save_last else A2
    zz = z3 if z3 is not None else u4[0]
    common = dict(
        HAS_D=D is not None, HAS_DB=db is not None, HAS_Z=z3 is not None, SOFTPLUS=softplus,
        ROUTED=routes is not None, ACCUM=accum, SAVE_LAST=save_last, SAVE_STATES=save_states, T=T, BD=BD, NP=NP,
        **_launch_opts(cfg),
    )  # fmt: skip
    opt = (D if D is not None else A2, db if db is not None else A2)
    r = routes if routes is not None else A2
    grid = (triton.cdiv(dim, BD), batch, R)
    # options of the seq-family kernels (PIN: see _state_offsets; no inline PTX under the interpreter)
    seq_opts = dict(FAST=not _INTERPRET, PIN=cfg.get("PIN", True), PREFETCH=0 if _INTERPRET else cfg.get("PREFETCH", 0))
    seq_opts["DTRP"] = wdt.shape[1] if wdt is not None else 0
    if wdt is not None and cfg["kind"] not in ("split", "seq"):
        raise ValueError(f"vim_kernels: a fused dt_proj needs the seq or split forward; the config has {cfg['kind']!r}")
    if cfg["kind"] == "split":
        seg_len = cfg["SEG"]
        if seg_len % T:
            raise ValueError(f"vim_kernels: the split forward's SEG={seg_len} must be a multiple of T={T}")
        nseg = triton.cdiv(L, seg_len)
        hend = torch.empty((R, batch, nseg, NP, dim), device=dev, dtype=torch.float32)
        dtsum = torch.empty((R, batch, nseg, dim), device=dev, dtype=torch.float32)
        for final in (False, True):
            _scan_fwd_split_kernel[(triton.cdiv(dim, BD), batch, R * (nseg - 1))](
                u4, dt4, A2, BC, *opt, zz, out4, hs, last, r, hend, dtsum, wdt if wdt is not None else A2, L, dim,
                nchunk, batch, nseg,
                *u4.stride(), *dt4.stride(), *zz.stride(), *out4.stride(), SEG=seg_len, FINAL=final, **seq_opts,
                **common,
            )  # fmt: skip
    elif cfg["kind"] == "seq":
        _scan_fwd_seq_kernel[grid](
            u4, dt4, A2, BC, *opt, zz, out4, hs, last, r, wdt if wdt is not None else A2, L, dim, nchunk, batch,
            *u4.stride(), *dt4.stride(), *zz.stride(), *out4.stride(), DEPTH=cfg.get("DEPTH", 2), **seq_opts,
            **common,
        )  # fmt: skip
    else:
        Bv, Cv = BC[..., :NP], BC[..., NP:]
        _scan_fwd_kernel[grid](
            u4, dt4, A2, Bv, Cv, *opt, zz, out4, hs, last, r, L, dim, NP, nchunk, batch,
            *u4.stride(), *dt4.stride(), *Bv.stride(), *Cv.stride(), *zz.stride(), *out4.stride(),
            PREFETCH=bool(cfg.get("PREFETCH", 0)) and not _INTERPRET, **common,
        )  # fmt: skip
    return (hs if save_states else None), (last if save_last else None), T


def _launch_bwd(u4, dt4, A2, BC, D, db, z3, dout4, hs, T, routes, du4, ddt4, dz3, softplus, batch, L, dim, R):
    cfg = _bwd_config(batch, dim, R, T)
    BD = cfg["BD"]
    NP = A2.shape[1]
    nchunk = triton.cdiv(L, T)
    assert hs.shape[2] == nchunk
    dev = u4.device
    # every atomically summed gradient in one zeroed buffer (one op): dBC, dA, dD, ddb
    n_bc, n_a = R * batch * L * 2 * NP, R * NP * dim
    acc = torch.zeros(n_bc + n_a + 2 * R * dim, device=dev, dtype=torch.float32)
    dBC = acc[:n_bc].view(R, batch, L, 2 * NP)
    dA = acc[n_bc : n_bc + n_a].view(R, NP, dim)
    dD = acc[n_bc + n_a : n_bc + n_a + R * dim].view(R, dim) if D is not None else None
    ddb = acc[n_bc + n_a + R * dim :].view(R, dim) if db is not None else None
    zz = z3 if z3 is not None else u4[0]
    dzz = dz3 if dz3 is not None else u4[0]
    opt = (D if D is not None else A2, db if db is not None else A2)
    r = routes if routes is not None else A2
    grads = (du4, ddt4, dzz, dA)
    dopt = (dD if dD is not None else dA, ddb if ddb is not None else dA)
    strides = (*zz.stride(), *dout4.stride(), *du4.stride(), *ddt4.stride(), *dzz.stride())
    common = dict(
        HAS_D=D is not None, HAS_DB=db is not None, HAS_Z=z3 is not None, SOFTPLUS=softplus,
        ROUTED=routes is not None, T=T, BD=BD, NP=NP, **_launch_opts(cfg),
    )  # fmt: skip
    grid = (triton.cdiv(dim, BD), batch, R)
    if cfg["kind"] == "seq":
        subs = cfg.get("SUBS", 1)
        if T % subs:
            raise ValueError(f"vim_kernels: SUBS={subs} must divide T={T}")
        seg_len = cfg.get("SEG", 0)  # split L: segments of SEG steps, a multiple of T
        if seg_len >= L:
            seg_len = 0  # one segment: nothing to split
        if seg_len % T:
            raise ValueError(f"vim_kernels: the split backward's SEG={seg_len} must be a multiple of T={T}")
        nseg = triton.cdiv(L, seg_len) if seg_len else 1
        pin = cfg.get("PIN", True)  # see _state_offsets
        gout = dtsum = dA  # stand-ins, never read without SEG
        if seg_len:
            gout = torch.empty((R, batch, nseg, NP, dim), device=dev, dtype=torch.float32)
            dtsum = torch.empty((R, batch, nseg, dim), device=dev, dtype=torch.float32)
            grid = (triton.cdiv(dim, BD), batch, R * nseg)
            _scan_bwd_split_prep_kernel[grid](
                dt4, A2, BC, opt[1], zz, dout4, r, gout, dtsum, L, dim, batch, nseg, *dt4.stride(), *zz.stride(),
                *dout4.stride(), HAS_DB=db is not None, HAS_Z=z3 is not None, SOFTPLUS=softplus,
                ROUTED=routes is not None, BD=BD, NP=NP, FAST=not _INTERPRET, SEG=seg_len, PIN=pin,
                num_warps=cfg["num_warps"],
            )  # fmt: skip
        _scan_bwd_seq_kernel[grid](
            u4, dt4, A2, BC, *opt, zz, dout4, hs, r, *grads, dBC, *dopt, gout, dtsum, L, dim, nchunk, batch, nseg,
            *u4.stride(), *dt4.stride(), *strides, SUBS=subs, SEGC=seg_len // T,
            # the lane reduce-scatter is written for one warp of 32 channels, one per lane
            LANE_SUM=BD == 32 and cfg["num_warps"] == 1 and NP <= 32, LOG2NP=NP.bit_length() - 1,
            FAST=not _INTERPRET, PIN=pin, FLAT=bool(cfg.get("FLAT", False)),
            AHEAD=1 if _INTERPRET and cfg.get("AHEAD") == 3 else cfg.get("AHEAD", 0),  # 3 = 1 + L2 prefetch (PTX)
            **common,
        )  # fmt: skip
    else:
        Bv, Cv = BC[..., :NP], BC[..., NP:]
        _scan_bwd_kernel[grid](
            u4, dt4, A2, Bv, Cv, *opt, zz, dout4, hs, r, *grads, dBC, dBC[..., NP:], *dopt,
            L, dim, NP, nchunk, batch, *u4.stride(), *dt4.stride(), *Bv.stride(), *Cv.stride(), *strides,
            PREFETCH=bool(cfg.get("PREFETCH", 0)) and not _INTERPRET, **common,
        )  # fmt: skip
    return dA, dBC, dD, ddb  # callers slice the padded states off


def _as4(x):
    """(batch, dim, L) -> a (1, batch, L, dim) view (no copy): the kernels index (route, batch, time, channel)."""
    return x.transpose(1, 2).unsqueeze(0)


def _needs_grad(ctx, n: int) -> bool:
    return any(ctx.needs_input_grad[:n])


class SelectiveScanFn(torch.autograd.Function):
    """One route in mamba_ssm layout: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        batch, dim, L = u.shape
        N = A.shape[1]
        Df, dbf = _opt(D), _opt(delta_bias)
        A2, BC = _pack(A.float().unsqueeze(0), _as4(B), _as4(C))
        out = _empty(like=u)  # keeps u's memory layout (channel-last in, channel-last out)
        train = _needs_grad(ctx, 8)
        hs, last, ctx.T = _launch_fwd(
            _as4(u), _as4(delta), A2, BC, Df, dbf, z.transpose(1, 2) if z is not None else None, _as4(out), None,
            delta_softplus, False, return_last_state, train, batch, L, dim, 1,
        )  # fmt: skip
        if train:
            ctx.save_for_backward(u, delta, A2, BC, Df, z, dbf, hs)
        ctx.softplus = delta_softplus
        ctx.meta = (
            N,
            A.dtype,
            B.dtype,
            C.dtype,
            None if D is None else D.dtype,
            None if delta_bias is None else delta_bias.dtype,
        )
        if last is not None:
            last = last[:, :N].transpose(1, 2).contiguous()
            ctx.mark_non_differentiable(last)
        return (out, last) if return_last_state else out

    @staticmethod
    def backward(ctx, dout, *_):
        u, delta, A2, BC, Df, z, dbf, hs = ctx.saved_tensors
        batch, dim, L = u.shape
        N, a_dt, b_dt, c_dt, d_dt, db_dt = ctx.meta
        du, ddelta = _empty(like=u), _empty(like=delta)
        dz = _empty(like=z) if z is not None else None
        dA, dBC, dD, ddb = _launch_bwd(
            _as4(u), _as4(delta), A2, BC, Df, dbf, z.transpose(1, 2) if z is not None else None, _as4(dout), hs,
            ctx.T, None, _as4(du), _as4(ddelta), dz.transpose(1, 2) if dz is not None else None,
            ctx.softplus, batch, L, dim, 1,
        )  # fmt: skip
        dB, dC = _unpack_dBC(dBC[0], N, b_dt, c_dt)
        return (
            du,
            ddelta,
            dA[0, :N].t().to(a_dt),
            dB.transpose(1, 2),
            dC.transpose(1, 2),
            dD[0].to(d_dt) if dD is not None else None,
            dz,
            ddb[0].to(db_dt) if ddb is not None else None,
            None,
            None,
        )


_MERGE_BLOCK = 1024


# The forward-only entry forms delta from dt_proj and its low-rank input in the kernel up to this rank (vim_tiny: 12;
# each lane then holds a (rank, 1) column of dt_proj and a step's low-rank row in registers). A forward config's
# "DT_PROJ_MAX_RANK" overrides it (VIM_SCAN_CONFIG='{"fwd": {"DT_PROJ_MAX_RANK": 0}}' turns the fusion off)
DT_PROJ_MAX_RANK = 16


def _pack_dt_proj(dt_proj):
    """dt_proj (R, dim, dt_rank) -> (R, DTRP, dim) float32, zero-padded to a power of two: the kernels' tile."""
    R, dim, dtr = dt_proj.shape
    w = torch.zeros((R, _np(dtr), dim), device=dt_proj.device, dtype=torch.float32)
    w[:, :dtr] = dt_proj.transpose(1, 2)
    return w


def _multi_route_forward(u, delta, A, B, C, D, z, delta_bias, routes, softplus, train, dt_proj=None, out=None):
    # the shared forward of MultiRouteScanFn and multi_route_scan_forward: every route adds into one float32 buffer,
    # then one kernel takes the mean and the gate. Returns the output and what the backward needs
    R, batch, L, dim = u.shape
    Df, dbf = _opt(D), _opt(delta_bias)
    dt_low = delta if dt_proj is not None else None
    # forward only, 16-bit B, C (and dt_low) stay 16-bit in the packed rows (the backward kernels read float32 rows)
    dtypes = {B.dtype, C.dtype} | ({dt_low.dtype} if dt_low is not None else set())
    same_16bit = len(dtypes) == 1 and B.dtype in (torch.bfloat16, torch.float16)
    A2, BC = _pack(A.float(), B, C, dt_low, B.dtype if same_16bit and not train else torch.float32)
    routes = routes.contiguous()
    acc = torch.zeros((batch, L, dim), device=u.device, dtype=torch.float32)
    wdt = _pack_dt_proj(dt_proj) if dt_proj is not None else None
    hs, _, T = _launch_fwd(
        u, u if wdt is not None else delta, A2, BC, Df, dbf, None, acc.unsqueeze(0).expand(R, batch, L, dim),
        routes, softplus, True, False, train, batch, L, dim, R, wdt=wdt,
    )  # fmt: skip
    zc = z.contiguous() if z is not None else None
    if out is None:
        out = _empty((batch, L, dim), device=u.device, dtype=u.dtype)
    n = out.numel()
    # out may be z itself: each element of z is read before the same program writes that element of out
    _merge_fwd_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
        acc, zc if zc is not None else acc, out, n, 1.0 / R, HAS_Z=zc is not None, BLOCK=_MERGE_BLOCK
    )
    return out, (A2, BC, Df, zc, dbf, routes, hs, acc), T


def can_fuse_dt_proj(batch: int, dim: int, R: int, L: int, N: int, dt_rank: int) -> bool:
    """Whether multi_route_scan_forward forms delta in the kernel at this shape (a rank up to DT_PROJ_MAX_RANK, and
    the seq or split forward: what the GPU's "auto" config picks)."""
    cfg = _fwd_config(batch, dim, R, L, _np(N))
    return dt_rank <= cfg.get("DT_PROJ_MAX_RANK", DT_PROJ_MAX_RANK) and cfg["kind"] in ("seq", "split")


def multi_route_scan_forward(u, delta, A, B, C, D, z, delta_bias, routes, softplus, dt_proj=None, out=None):
    """MultiRouteScanFn's forward alone (no autograd graph, nothing saved). With dt_proj (R, dim, dt_rank), delta
    is the low-rank (R, batch, L, dt_rank) input, packed beside B and C, and each step's delta, dt_proj @ that row,
    is formed in registers: no (R, batch, L, dim) delta tensor (see can_fuse_dt_proj). out: a (batch, L, dim)
    contiguous buffer for the result (z itself is allowed)."""
    if out is not None and (not out.is_contiguous() or tuple(out.shape) != (u.shape[1], u.shape[2], u.shape[3])):
        raise ValueError(f"out must be a contiguous (batch, L, dim) tensor; got {tuple(out.shape)}")
    y, _, _ = _multi_route_forward(u, delta, A, B, C, D, z, delta_bias, routes, softplus, False, dt_proj, out)
    return y


class MultiRouteScanFn(torch.autograd.Function):
    """R routes in token order, one launch: u, delta (R, batch, L, dim); routes (R, L); see the functional API."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus):
        N = A.shape[2]
        train = _needs_grad(ctx, 8)
        out, (A2, BC, Df, zc, dbf, routes, hs, acc), ctx.T = _multi_route_forward(
            u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus, train
        )
        if train:
            ctx.save_for_backward(u, delta, A2, BC, Df, zc, dbf, routes, hs, acc)
        ctx.softplus = delta_softplus
        ctx.meta = (
            N,
            A.dtype,
            B.dtype,
            C.dtype,
            None if D is None else D.dtype,
            None if delta_bias is None else delta_bias.dtype,
        )
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A2, BC, Df, zc, dbf, routes, hs, acc = ctx.saved_tensors
        R, batch, L, dim = u.shape
        N, a_dt, b_dt, c_dt, d_dt, db_dt = ctx.meta
        dout = dout.contiguous()
        dy = _empty((batch, L, dim), device=u.device, dtype=torch.float32)
        dz = _empty(like=zc) if zc is not None else None
        n = dy.numel()
        _merge_bwd_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
            acc, zc if zc is not None else acc, dout, dy, dz if dz is not None else dy, n, 1.0 / R,
            HAS_Z=zc is not None, BLOCK=_MERGE_BLOCK,
        )  # fmt: skip
        du, ddelta = _empty(like=u), _empty(like=delta)
        dA, dBC, dD, ddb = _launch_bwd(
            u, delta, A2, BC, Df, dbf, None, dy.unsqueeze(0).expand(R, batch, L, dim), hs, ctx.T, routes,
            du, ddelta, None, ctx.softplus, batch, L, dim, R,
        )  # fmt: skip
        dB, dC = _unpack_dBC(dBC, N, b_dt, c_dt)
        return (
            du,
            ddelta,
            dA[:, :N].transpose(1, 2).to(a_dt),
            dB,
            dC,
            dD.to(d_dt) if dD is not None else None,
            dz,
            ddb.to(db_dt) if ddb is not None else None,
            None,
            None,
        )
