"""Triton backward kernels of the selective scan: the one-step backward and the split-L backward's first launch.

The forward saved the state every T steps. The backward walks the saved chunks last to first, in sub-chunks of
S = T / SUBS steps (last first): it recomputes a sub-chunk's states from the chunk's saved one, then walks back with
the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}. dB and dC (sums over channels) are reduced across the lanes and added
with relaxed atomics; dA, dD and d(delta_bias) are summed per program and added once at its end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .scan_common import (
    _channel_block,
    _fold_segment,
    _load_once,
    _segment_program,
    _softplus_fast,
    _state_offsets,
    _step_delta,
    _step_token,
    _store_once,
    _store_segment,
)


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
    # ptr[n] += sum over this program's channels of x[n, :] (x: (NP, BD)); relaxed atomics (no fences). LANE_SUM
    # (NP <= 32): the lane reduce-scatter, one atomic per lane; else a reduction per row
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
    BD: tl.constexpr, NP: tl.constexpr, FAST: tl.constexpr, SEG: tl.constexpr,
):  # fmt: skip
    # Split-L backward, first launch: each segment's adjoint walked last step to first from zero,
    # g_t = C_t dy_t + a_{t+1} g_{t+1}; stores what it hands to the earlier segment, a_t0 g_t0, and its delta sum
    # (its total decay is exp(A * that sum)). dy needs dout and z only, not the states.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r, seg = _segment_program(NSEG)
    rd, rn, dmask, A2, _, dbv = _channel_block(A_ptr, A_ptr, db_ptr, pid_d, pid_r, DIM, False, HAS_DB, BD, NP)
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
    _store_segment(gout_ptr, dtsum_ptr, (pid_r * BATCH + pid_b) * NSEG + seg, gnext, dts, rn, rd, dmask, DIM, NP)


@triton.jit
def _recompute_step(h, A2, dbv, t, u_base, dt_base, BC_base, r_base, L, s_u_l, s_dt_l, dmask,
                    ROUTED: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
                    NP: tl.constexpr):  # fmt: skip
    # the state one step on (no output): the recomputation of a sub-chunk's start state. The delta is formed inline
    # (the step-past-the-end test after the softplus, as the rest of the backward orders it)
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
def _row_ptrs(base, tok, s_l):
    # (S, BD) pointers to S rows. Hinted unaligned like the state tiles (_state_offsets): else Triton vectorises
    # the load along the channels and the (S, BD) tiles, and the loop after them, leave one channel per lane.
    return tl.multiple_of(base[None, :] + (tok * s_l)[:, None], [1, 1])


@triton.jit
def _bwd_rows(t0, u_base, dt_base, do_base, z_base, r_base, L, s_u_l, s_dt_l, s_do_l, s_z_l, dmask,
              S: tl.constexpr, ROUTED: tl.constexpr, HAS_Z: tl.constexpr):  # fmt: skip
    # the per-channel rows (u, delta, dout, z) of steps t0 .. t0 + S - 1 as (S, BD) fp32 tiles, S in-thread, loaded
    # at once at a sub-chunk's start: loaded step by step, each step would wait a full memory latency, since the
    # previous step's stores and atomics keep the compiler from moving the loads up (they might alias)
    tok = _step_token(r_base, t0 + tl.arange(0, S), L, ROUTED)
    m = dmask[None, :]
    U = _load_once(_row_ptrs(u_base, tok, s_u_l), m).to(tl.float32)
    DT = _load_once(_row_ptrs(dt_base, tok, s_dt_l), m).to(tl.float32)
    DO = _load_once(_row_ptrs(do_base, tok, s_do_l), m).to(tl.float32)
    Z = U
    if HAS_Z:
        Z = _load_once(_row_ptrs(z_base, tok, s_z_l), m).to(tl.float32)
    return U, DT, DO, Z


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
    LANE_SUM: tl.constexpr, LOG2NP: tl.constexpr, FAST: tl.constexpr, SEGC: tl.constexpr,
):  # fmt: skip
    # One sub-chunk of S = T / SUBS steps per iteration of the dynamic loop (the unrolled body stays one sub-chunk
    # whatever SUBS is, so a register cap fits every T). Per sub-chunk: its start state recomputed from the chunk's
    # saved one (a plain walk); phase 1 walks its S steps forward and forms y, dz, dy and dC (which need only h_t),
    # keeping each step's decayed previous state a_t h_{t-1} in an (S, NP, BD) register tile (unrolled, the S axis
    # in-thread, so the selects on it fold away: _pick); phase 2 walks them backward with one FMA of loop-carried
    # dependency, g_t = C_t dy_t + a_{t+1} g_{t+1}, and forms du, ddelta, dA, dB from g_t and that tile.
    # SEGC > 0 (split L): one program per segment of SEGC chunks, NSEG of them; its incoming a g from the later
    # segments is folded from _scan_bwd_split_prep_kernel's records first.
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
    rd, rn, dmask, A2, Dv, dbv = _channel_block(A_ptr, D_ptr, db_ptr, pid_d, pid_r, DIM, HAS_D, HAS_DB, BD, NP)
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
            gnext = _fold_segment(gnext, gout_ptr, dtsum_ptr, rb + NSEG - 1 - i, A2, rn, rd, dmask, DIM, NP)
    dA_acc = tl.zeros((NP, BD), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    ddb_acc = tl.zeros((BD,), dtype=tl.float32)
    rows = (u_base, dt_base, do_base, z_base, r_base, L, s_u_l, s_dt_l, s_do_l, s_z_l, dmask)
    for it in range((c_hi - c_lo) * SUBS):
        c = c_hi - 1 - it // SUBS
        tb = c * T + (SUBS - 1 - it % SUBS) * S  # this visit's first step: a chunk's sub-chunks last first
        cU, cDT, cDO, cZ = _bwd_rows(tb, *rows, S, ROUTED, HAS_Z)
        h = _load_once(hs_base + c * NP * DIM + _state_offsets(rn, rd, DIM), dmask[None, :])
        # ---- recompute the sub-chunk's start state
        if SUBS > 1:
            ld = (u_base, dt_base, BC_base, r_base, L, s_u_l, s_dt_l, dmask)
            for k in range(tb - c * T):
                h = _recompute_step(h, A2, dbv, c * T + k, *ld, ROUTED, HAS_DB, SOFTPLUS, FAST, NP)
        AHs = tl.zeros((S, NP, BD), dtype=tl.float32)
        Us = tl.zeros((S, BD), dtype=tl.float32)
        DTs = tl.zeros((S, BD), dtype=tl.float32)
        DYs = tl.zeros((S, BD), dtype=tl.float32)
        SPs = tl.zeros((S, BD), dtype=tl.float32)
        # ---- phase 1: forward through the sub-chunk
        for k in tl.static_range(S):
            t = tb + k
            live = t < L
            tok = _step_token(r_base, t, L, ROUTED)
            m1 = dmask & live
            u, dt_raw, dout = _pick(cU, rk2, k), _pick(cDT, rk2, k), _pick(cDO, rk2, k)
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
                zv = _pick(cZ, rk2, k)
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
            t = tb + k
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
            _add_over_channels(dBC_base + tok * (2 * NP), g * dtu[None, :], lane, rn, live, LANE_SUM, NP, LOG2NP, BD)
            _store_once(du_base + tok * s_du_l, du.to(du_ptr.dtype.element_ty), m1)
            _store_once(ddt_base + tok * s_ddt_l, ddt.to(ddt_ptr.dtype.element_ty), m1)
    tl.atomic_add(dA_ptr + pid_r * NP * DIM + _state_offsets(rn, rd, DIM), dA_acc, mask=dmask[None, :], sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + pid_r * DIM + rd, dD_acc, mask=dmask, sem="relaxed")
    if HAS_DB:
        tl.atomic_add(ddb_ptr + pid_r * DIM + rd, ddb_acc, mask=dmask, sem="relaxed")
