"""Triton selective scan: chunked forward/backward kernels, single- and multi-route, behind autograd Functions."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Launch shape. T: time steps per chunk (one associative scan per chunk; chunk-start states are saved for the
# backward every T steps); BD: channels per program; the state tile of a chunk is (T, BD, N) fp32 in registers.
# fwd kind "chunk": one associative scan per chunk; "seq": one step per iteration (state tile (N, BD)).
# Under the interpreter every element of a scan is one Python call, so tiles are kept tiny there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CONFIG = {
    "fwd": {"kind": "chunk", "T": 4, "BD": 4, "num_warps": 1}
    if _INTERPRET
    else {"kind": "auto", "T": 8, "BD": 64, "num_warps": 1},
    "bwd": {"kind": "seq", "T": 4, "BD": 4, "num_warps": 1, "store_a": False}
    if _INTERPRET
    else {"kind": "auto", "T": 8, "BD": 32, "num_warps": 1, "store_a": False},
}
# bwd kind "seq": _scan_bwd_seq_kernel (one step at a time, chunk states in registers); "chunk": _scan_bwd_kernel
# (two associative scans per chunk); "auto": seq, unless the grid is small (then _BWD_SMALL_GRID's settings).
# H200, (128, 768, 197): seq T 8, BD 32, 1 warp 3.08 ms backward vs chunk 3.29 ms (benchmarks/README.md). The seq
# kernel is not yet timed at long L / small grids, so those keep the measured chunk settings.
_BWD_SMALL_GRID = {"kind": "chunk", "BD": 32, "num_warps": 4}
# VIM_SCAN_CONFIG='{"fwd": {...}, "bwd": {...}}' overrides entries (benchmarks try variants this way)
if os.environ.get("VIM_SCAN_CONFIG"):
    import json as _json

    for _k, _v in _json.loads(os.environ["VIM_SCAN_CONFIG"]).items():
        CONFIG[_k].update(_v)
# fwd kind "auto": the one-step kernel (fastest at Vim's batch sizes, 0.62 vs 0.84 ms at (128, 768, 197) on an
# H200) needs many programs to hide its per-step latency; with few programs (long L, small batch) the chunked
# kernel with small channel blocks is 4x faster (2.7 vs 10.4 ms at (16, 384, 6085)).
_SEQ_MIN_PROGRAMS = 1024
_CHUNK_SMALL_GRID = {"kind": "chunk", "BD": 16, "num_warps": 2}


def _fwd_config(batch: int, dim: int, R: int) -> dict:
    cfg = dict(CONFIG["fwd"])
    if cfg.get("kind") == "auto":
        if batch * R * triton.cdiv(dim, cfg["BD"]) >= _SEQ_MIN_PROGRAMS:
            cfg["kind"] = "seq"
        else:
            cfg.update(_CHUNK_SMALL_GRID)
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
    ROUTED: tl.constexpr, ACCUM: tl.constexpr, SAVE_LAST: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    rk = tl.arange(0, T)
    dmask = rd < DIM
    nmask = rn < N
    dn_mask = dmask[:, None] & nmask[None, :]
    # padded channels/states get A = 0 (decay 1) and zero inputs, so they stay exactly zero
    A = tl.load(A_ptr + pid_r * DIM * N + rd[:, None] * N + rn[None, :], mask=dn_mask, other=0.0)
    A2 = A * 1.4426950408889634  # exp(dt*A) = exp2(dt*A*log2(e))
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
        tl.store(hs_base + c * DIM * NP + rd[:, None] * NP + rn[None, :], h, mask=dmask[:, None])
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
            tl.atomic_add(o_ptrs, y, mask=m2)
        else:
            if HAS_Z:
                zv = tl.load(z_ptr + pid_b * s_z_b + tok[:, None] * s_z_l + rd[None, :] * s_z_d, mask=m2, other=0.0)
                zv = zv.to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m2)
    if SAVE_LAST:
        tl.store(last_ptr + (pid_r * BATCH + pid_b) * DIM * N + rd[:, None] * N + rn[None, :], h, mask=dn_mask)


@triton.jit
def _scan_fwd_seq_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, db_ptr, z_ptr, out_ptr, hs_ptr, last_ptr, route_ptr,
    L, DIM, N, NCHUNK, BATCH,
    s_u_r, s_u_b, s_u_l, s_u_d,
    s_dt_r, s_dt_b, s_dt_l, s_dt_d,
    s_B_r, s_B_b, s_B_l, s_B_n,
    s_C_r, s_C_b, s_C_l, s_C_n,
    s_z_b, s_z_l, s_z_d,
    s_o_r, s_o_b, s_o_l, s_o_d,
    HAS_D: tl.constexpr, HAS_DB: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ROUTED: tl.constexpr, ACCUM: tl.constexpr, SAVE_LAST: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    # Same contract as _scan_fwd_kernel, one time step per iteration: the state tile is (NP, BD) with the
    # channels across threads and the N states of a channel inside one thread, so <C_t, h_t> needs no shuffles
    # and the only loop-carried dependency is one FMA per state.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    dmask = rd < DIM
    nmask = rn < N
    nd_mask = nmask[:, None] & dmask[None, :]
    A = tl.load(A_ptr + pid_r * DIM * N + rd[None, :] * N + rn[:, None], mask=nd_mask, other=0.0)
    A2 = A * 1.4426950408889634
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
    h = tl.zeros((NP, BD), dtype=tl.float32)
    for c in range(NCHUNK):
        tl.store(hs_base + c * DIM * NP + rd[None, :] * NP + rn[:, None], h, mask=dmask[None, :])
        for k in range(T):
            t = c * T + k
            live = t < L
            if ROUTED:
                tok = tl.load(route_ptr + pid_r * L + t, mask=live, other=0)
            else:
                tok = t.to(tl.int64)
            m1 = dmask & live
            u = tl.load(u_base + tok * s_u_l + rd * s_u_d, mask=m1, other=0.0).to(tl.float32)
            dt = tl.load(dt_base + tok * s_dt_l + rd * s_dt_d, mask=m1, other=0.0).to(tl.float32)
            if HAS_DB:
                dt = dt + dbv
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(m1, dt, 0.0)
            Bt = tl.load(B_base + tok * s_B_l + rn * s_B_n, mask=nmask & live, other=0.0).to(tl.float32)
            Ct = tl.load(C_base + tok * s_C_l + rn * s_C_n, mask=nmask & live, other=0.0).to(tl.float32)
            a = tl.exp2(dt[None, :] * A2)
            h = a * h + Bt[:, None] * (dt * u)[None, :]
            y = tl.sum(h * Ct[:, None], axis=0)
            if HAS_D:
                y = y + u * Dv
            o_ptrs = o_base + tok * s_o_l + rd * s_o_d
            if ACCUM:
                tl.atomic_add(o_ptrs, y, mask=m1)
            else:
                if HAS_Z:
                    zv = tl.load(z_ptr + pid_b * s_z_b + tok * s_z_l + rd * s_z_d, mask=m1, other=0.0).to(tl.float32)
                    y = y * zv * tl.sigmoid(zv)
                tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m1)
    if SAVE_LAST:
        tl.store(last_ptr + (pid_r * BATCH + pid_b) * DIM * N + rd[None, :] * N + rn[:, None], h, mask=nd_mask)


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
    ROUTED: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    rk = tl.arange(0, T)
    dmask = rd < DIM
    nmask = rn < N
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + pid_r * DIM * N + rd[:, None] * N + rn[None, :], mask=dn_mask, other=0.0)
    A2 = A * 1.4426950408889634
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
    # dB, dC: fp32 (R, batch, L, N) contiguous, summed over channel blocks with atomics
    dBC_off = (pid_r * BATCH + pid_b) * L * N
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
        h0 = tl.load(hs_base + c * DIM * NP + rd[:, None] * NP + rn[None, :], mask=dmask[:, None], other=0.0)
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
        ddt = u * gB + tl.sum(gah * A[None, :, :], axis=2)
        if SOFTPLUS:
            ddt = tl.where(dt_raw <= 20.0, ddt * tl.sigmoid(dt_raw), ddt)
        ddt = tl.where(m2, ddt, 0.0)
        if HAS_DB:
            ddb_acc += tl.sum(ddt, axis=0)
        dA_acc += tl.sum(gah * dt[:, :, None], axis=0)
        dB = tl.sum(g * (dt * u)[:, :, None], axis=1)
        dC = tl.sum(hh * dy[:, :, None], axis=1)
        bc_ptrs = dBC_off + tok[:, None] * N + rn[None, :]
        tl.atomic_add(dB_ptr + bc_ptrs, dB, mask=mn)
        tl.atomic_add(dC_ptr + bc_ptrs, dC, mask=mn)
        tl.store(du_base + tok[:, None] * s_du_l + rd[None, :] * s_du_d, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_base + tok[:, None] * s_ddt_l + rd[None, :] * s_ddt_d, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    tl.atomic_add(dA_ptr + pid_r * DIM * N + rd[:, None] * N + rn[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + pid_r * DIM + rd, dD_acc, mask=dmask)
    if HAS_DB:
        tl.atomic_add(ddb_ptr + pid_r * DIM + rd, ddb_acc, mask=dmask)


@triton.jit
def _scan_bwd_seq_kernel(
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
    ROUTED: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, STORE_A: tl.constexpr,
):  # fmt: skip
    # Same contract as _scan_bwd_kernel, one time step at a time, in the layout of the one-step forward: tiles
    # (NP, BD), a channel's N states inside one thread (sums over N need no shuffles). Per chunk (last first):
    # phase 1 walks the chunk forward from its saved start state, keeping the T states in a (T, NP, BD) register
    # tile (the where/sum over its T axis fold away: the loops are unrolled and T lies inside each thread), and
    # forms y, dz, dC, which need only h_t; phase 2 walks the chunk backward with one FMA of loop-carried
    # dependency (g_t = C_t dy_t + a_{t+1} g_{t+1}) and forms du, ddt, dA, dB.
    # a_t h_{t-1} = h_t - B_t dt_t u_t, so the previous state is never needed.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    rd = pid_d * BD + tl.arange(0, BD)
    rn = tl.arange(0, NP)
    rk3 = tl.arange(0, T)[:, None, None]
    rk2 = tl.arange(0, T)[:, None]
    dmask = rd < DIM
    nmask = rn < N
    nd_mask = nmask[:, None] & dmask[None, :]
    A2 = tl.load(A_ptr + pid_r * DIM * N + rd[None, :] * N + rn[:, None], mask=nd_mask, other=0.0)
    A2 = A2 * 1.4426950408889634
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
    dBC_off = (pid_r * BATCH + pid_b) * L * N
    hs_base = hs_ptr + (pid_r * BATCH + pid_b) * NCHUNK * DIM * NP
    gnext = tl.zeros((NP, BD), dtype=tl.float32)  # a_{t+1} g_{t+1}, handed from the later step/chunk
    dA_acc = tl.zeros((NP, BD), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    ddb_acc = tl.zeros((BD,), dtype=tl.float32)
    for ci in range(NCHUNK):
        c = NCHUNK - 1 - ci
        h = tl.load(hs_base + c * DIM * NP + rd[None, :] * NP + rn[:, None], mask=dmask[None, :], other=0.0)
        Hs = tl.zeros((T, NP, BD), dtype=tl.float32)
        if STORE_A:
            As = tl.zeros((T, NP, BD), dtype=tl.float32)
        Us = tl.zeros((T, BD), dtype=tl.float32)
        DTs = tl.zeros((T, BD), dtype=tl.float32)
        DYs = tl.zeros((T, BD), dtype=tl.float32)
        SPs = tl.zeros((T, BD), dtype=tl.float32)
        # ---- phase 1: forward through the chunk
        for k in tl.static_range(T):
            t = c * T + k
            live = t < L
            if ROUTED:
                tok = tl.load(route_ptr + pid_r * L + t, mask=live, other=0)
            else:
                tok = t.to(tl.int64)
            m1 = dmask & live
            mn = nmask & live
            u = tl.load(u_base + tok * s_u_l + rd * s_u_d, mask=m1, other=0.0).to(tl.float32)
            dt_raw = tl.load(dt_base + tok * s_dt_l + rd * s_dt_d, mask=m1, other=0.0).to(tl.float32)
            dout = tl.load(do_base + tok * s_do_l + rd * s_do_d, mask=m1, other=0.0).to(tl.float32)
            Bt = tl.load(B_base + tok * s_B_l + rn * s_B_n, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_base + tok * s_C_l + rn * s_C_n, mask=mn, other=0.0).to(tl.float32)
            if HAS_DB:
                dt_raw = dt_raw + dbv
            if SOFTPLUS:
                dt = _softplus(dt_raw)
                SPs = tl.where(rk2 == k, tl.where(dt_raw <= 20.0, tl.sigmoid(dt_raw), 1.0)[None, :], SPs)
            else:
                dt = dt_raw
            dt = tl.where(m1, dt, 0.0)
            a = tl.exp2(dt[None, :] * A2)
            h = a * h + Bt[:, None] * (dt * u)[None, :]
            Hs = tl.where(rk3 == k, h[None, :, :], Hs)
            if STORE_A:
                As = tl.where(rk3 == k, a[None, :, :], As)
            if HAS_Z:
                y = tl.sum(h * Ct[:, None], axis=0)
                if HAS_D:
                    y = y + u * Dv
                zv = tl.load(z_ptr + pid_b * s_z_b + tok * s_z_l + rd * s_z_d, mask=m1, other=0.0).to(tl.float32)
                sz = tl.sigmoid(zv)
                dy = dout * zv * sz
                dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
                tl.store(dz_ptr + pid_b * s_dz_b + tok * s_dz_l + rd * s_dz_d, dz.to(dz_ptr.dtype.element_ty), mask=m1)
            else:
                dy = dout
            if HAS_D:
                dD_acc += dy * u
            dC = tl.sum(h * dy[None, :], axis=1)
            tl.atomic_add(dC_ptr + dBC_off + tok * N + rn, dC, mask=mn)
            Us = tl.where(rk2 == k, u[None, :], Us)
            DTs = tl.where(rk2 == k, dt[None, :], DTs)
            DYs = tl.where(rk2 == k, dy[None, :], DYs)
        # ---- phase 2: backward through the chunk
        for kk in tl.static_range(T):
            k = T - 1 - kk
            t = c * T + k
            live = t < L
            if ROUTED:
                tok = tl.load(route_ptr + pid_r * L + t, mask=live, other=0)
            else:
                tok = t.to(tl.int64)
            m1 = dmask & live
            mn = nmask & live
            Bt = tl.load(B_base + tok * s_B_l + rn * s_B_n, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_base + tok * s_C_l + rn * s_C_n, mask=mn, other=0.0).to(tl.float32)
            u = tl.sum(tl.where(rk2 == k, Us, 0.0), axis=0)
            dt = tl.sum(tl.where(rk2 == k, DTs, 0.0), axis=0)
            dy = tl.sum(tl.where(rk2 == k, DYs, 0.0), axis=0)
            hk = tl.sum(tl.where(rk3 == k, Hs, 0.0), axis=0)
            if STORE_A:
                a = tl.sum(tl.where(rk3 == k, As, 0.0), axis=0)
            else:
                a = tl.exp2(dt[None, :] * A2)
            dtu = dt * u
            ah = hk - Bt[:, None] * dtu[None, :]  # a_t h_{t-1}
            g = Ct[:, None] * dy[None, :] + gnext
            gnext = a * g
            gB = tl.sum(g * Bt[:, None], axis=0)
            gah = g * ah
            du = dt * gB
            if HAS_D:
                du = du + dy * Dv
            ddt = u * gB + tl.sum(gah * A2, axis=0) * 0.6931471805599453  # A = A2 * ln 2
            if SOFTPLUS:
                ddt = ddt * tl.sum(tl.where(rk2 == k, SPs, 0.0), axis=0)
            ddt = tl.where(m1, ddt, 0.0)
            if HAS_DB:
                ddb_acc += ddt
            dA_acc += gah * dt[None, :]
            dB = tl.sum(g * dtu[None, :], axis=1)
            tl.atomic_add(dB_ptr + dBC_off + tok * N + rn, dB, mask=mn)
            tl.store(du_base + tok * s_du_l + rd * s_du_d, du.to(du_ptr.dtype.element_ty), mask=m1)
            tl.store(ddt_base + tok * s_ddt_l + rd * s_ddt_d, ddt.to(ddt_ptr.dtype.element_ty), mask=m1)
    tl.atomic_add(dA_ptr + pid_r * DIM * N + rd[None, :] * N + rn[:, None], dA_acc, mask=nd_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + pid_r * DIM + rd, dD_acc, mask=dmask)
    if HAS_DB:
        tl.atomic_add(ddb_ptr + pid_r * DIM + rd, ddb_acc, mask=dmask)


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


def _launch_fwd(u4, dt4, A, B4, C4, D, db, z3, out4, routes, softplus, accum, save_last, batch, L, dim, N, R):
    cfg = _fwd_config(batch, dim, R)
    T, BD = cfg["T"], cfg["BD"]
    NP = _np(N)
    nchunk = triton.cdiv(L, T)
    hs = _empty((R, batch, nchunk, dim, NP), device=u4.device, dtype=torch.float32)
    last = _empty((R * batch, dim, N), device=u4.device, dtype=torch.float32) if save_last else hs
    dummy = A
    zz = z3 if z3 is not None else u4[0]
    kernel = _scan_fwd_seq_kernel if cfg.get("kind") == "seq" else _scan_fwd_kernel
    kernel[(triton.cdiv(dim, BD), batch, R)](
        u4, dt4, A, B4, C4,
        D if D is not None else dummy, db if db is not None else dummy, zz, out4, hs, last,
        routes if routes is not None else dummy,
        L, dim, N, nchunk, batch,
        *u4.stride(), *dt4.stride(), *B4.stride(), *C4.stride(), *zz.stride(), *out4.stride(),
        HAS_D=D is not None, HAS_DB=db is not None, HAS_Z=z3 is not None, SOFTPLUS=softplus,
        ROUTED=routes is not None, ACCUM=accum, SAVE_LAST=save_last, T=T, BD=BD, NP=NP,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return hs, (last if save_last else None)


def _bwd_config(batch: int, dim: int, R: int) -> dict:
    cfg = dict(CONFIG["bwd"])
    cfg.setdefault("kind", "chunk")
    if cfg["kind"] == "auto":
        cfg["kind"] = "seq"
        if batch * R * triton.cdiv(dim, cfg["BD"]) < _SEQ_MIN_PROGRAMS:
            cfg.update(_BWD_SMALL_GRID)
    return cfg


def _launch_bwd(u4, dt4, A, B4, C4, D, db, z3, dout4, hs, routes, du4, ddt4, dz3, softplus, batch, L, dim, N, R):
    cfg = _bwd_config(batch, dim, R)
    T, BD = cfg["T"], cfg["BD"]
    NP = _np(N)
    nchunk = triton.cdiv(L, T)
    if hs.shape[2] != nchunk or hs.shape[3] != dim:  # forward ran with another chunk length
        raise RuntimeError("vim_kernels: CONFIG['fwd']['T'] and CONFIG['bwd']['T'] must be equal")
    dev = u4.device
    dA = torch.zeros((R, dim, N), device=dev, dtype=torch.float32)
    dB = torch.zeros((R, batch, L, N), device=dev, dtype=torch.float32)
    dC = torch.zeros((R, batch, L, N), device=dev, dtype=torch.float32)
    dD = torch.zeros((R, dim), device=dev, dtype=torch.float32) if D is not None else None
    ddb = torch.zeros((R, dim), device=dev, dtype=torch.float32) if db is not None else None
    zz = z3 if z3 is not None else u4[0]
    dzz = dz3 if dz3 is not None else u4[0]
    if cfg["kind"] == "seq":
        kernel, extra = _scan_bwd_seq_kernel, {"STORE_A": bool(cfg.get("store_a", False))}
    else:
        kernel, extra = _scan_bwd_kernel, {}
    kernel[(triton.cdiv(dim, BD), batch, R)](
        u4, dt4, A, B4, C4,
        D if D is not None else A, db if db is not None else A, zz, dout4, hs,
        routes if routes is not None else A,
        du4, ddt4, dzz, dA, dB, dC, dD if dD is not None else dA, ddb if ddb is not None else dA,
        L, dim, N, nchunk, batch,
        *u4.stride(), *dt4.stride(), *B4.stride(), *C4.stride(), *zz.stride(), *dout4.stride(),
        *du4.stride(), *ddt4.stride(), *dzz.stride(),
        HAS_D=D is not None, HAS_DB=db is not None, HAS_Z=z3 is not None, SOFTPLUS=softplus,
        ROUTED=routes is not None, T=T, BD=BD, NP=NP, num_warps=cfg["num_warps"], **extra,
    )  # fmt: skip
    return dA, dB, dC, dD, ddb


def _as4(x):
    """(batch, dim, L) -> a (1, batch, L, dim) view (no copy): the kernels index (route, batch, time, channel)."""
    return x.transpose(1, 2).unsqueeze(0)


class SelectiveScanFn(torch.autograd.Function):
    """One route in mamba_ssm layout: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        batch, dim, L = u.shape
        N = A.shape[1]
        Af, Df, dbf = _opt(A), _opt(D), _opt(delta_bias)
        out = _empty(like=u)  # keeps u's memory layout (channel-last in, channel-last out)
        hs, last = _launch_fwd(
            _as4(u), _as4(delta), Af, _as4(B), _as4(C), Df, dbf,
            z.transpose(1, 2) if z is not None else None, _as4(out), None,
            delta_softplus, False, return_last_state, batch, L, dim, N, 1,
        )  # fmt: skip
        ctx.save_for_backward(u, delta, Af, B, C, Df, z, dbf, hs)
        ctx.softplus = delta_softplus
        ctx.dtypes = (A.dtype, None if D is None else D.dtype, None if delta_bias is None else delta_bias.dtype)
        if last is not None:
            ctx.mark_non_differentiable(last)
        return (out, last) if return_last_state else out

    @staticmethod
    def backward(ctx, dout, *_):
        u, delta, Af, B, C, Df, z, dbf, hs = ctx.saved_tensors
        batch, dim, L = u.shape
        N = Af.shape[1]
        du, ddelta = _empty(like=u), _empty(like=delta)
        dz = _empty(like=z) if z is not None else None
        dA, dB, dC, dD, ddb = _launch_bwd(
            _as4(u), _as4(delta), Af, _as4(B), _as4(C), Df, dbf,
            z.transpose(1, 2) if z is not None else None, _as4(dout), hs, None,
            _as4(du), _as4(ddelta), dz.transpose(1, 2) if dz is not None else None,
            ctx.softplus, batch, L, dim, N, 1,
        )  # fmt: skip
        a_dt, d_dt, db_dt = ctx.dtypes
        return (
            du,
            ddelta,
            dA[0].to(a_dt),
            dB[0].transpose(1, 2).to(B.dtype),
            dC[0].transpose(1, 2).to(C.dtype),
            dD[0].to(d_dt) if dD is not None else None,
            dz,
            ddb[0].to(db_dt) if ddb is not None else None,
            None,
            None,
        )


_MERGE_BLOCK = 1024


class MultiRouteScanFn(torch.autograd.Function):
    """R routes in token order, one launch: u, delta (R, batch, L, dim); routes (R, L); see the functional API."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus):
        R, batch, L, dim = u.shape
        N = A.shape[2]
        Af, Df, dbf = _opt(A), _opt(D), _opt(delta_bias)
        routes = routes.contiguous()
        acc = torch.zeros((batch, L, dim), device=u.device, dtype=torch.float32)
        hs, _ = _launch_fwd(
            u, delta, Af, B, C, Df, dbf, None, acc.unsqueeze(0).expand(R, batch, L, dim), routes,
            delta_softplus, True, False, batch, L, dim, N, R,
        )  # fmt: skip
        zc = z.contiguous() if z is not None else None
        out = _empty((batch, L, dim), device=u.device, dtype=u.dtype)
        n = out.numel()
        _merge_fwd_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
            acc, zc if zc is not None else acc, out, n, 1.0 / R, HAS_Z=zc is not None, BLOCK=_MERGE_BLOCK
        )
        ctx.save_for_backward(u, delta, Af, B, C, Df, zc, dbf, routes, hs, acc)
        ctx.softplus = delta_softplus
        ctx.dtypes = (A.dtype, None if D is None else D.dtype, None if delta_bias is None else delta_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, Af, B, C, Df, zc, dbf, routes, hs, acc = ctx.saved_tensors
        R, batch, L, dim = u.shape
        N = Af.shape[2]
        dout = dout.contiguous()
        dy = _empty((batch, L, dim), device=u.device, dtype=torch.float32)
        dz = _empty(like=zc) if zc is not None else None
        n = dy.numel()
        _merge_bwd_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
            acc, zc if zc is not None else acc, dout, dy, dz if dz is not None else dy, n, 1.0 / R,
            HAS_Z=zc is not None, BLOCK=_MERGE_BLOCK,
        )  # fmt: skip
        du, ddelta = _empty(like=u), _empty(like=delta)
        dA, dB, dC, dD, ddb = _launch_bwd(
            u, delta, Af, B, C, Df, dbf, None, dy.unsqueeze(0).expand(R, batch, L, dim), hs, routes,
            du, ddelta, None, ctx.softplus, batch, L, dim, N, R,
        )  # fmt: skip
        a_dt, d_dt, db_dt = ctx.dtypes
        return (
            du,
            ddelta,
            dA.to(a_dt),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD.to(d_dt) if dD is not None else None,
            dz,
            ddb.to(db_dt) if ddb is not None else None,
            None,
            None,
        )
