"""Selective-scan backends (torch, Triton) and the multi-route entry points against the sequential reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import vim_kernels as vk

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN/inf anywhere fails."""
    assert torch.isfinite(x).all(), "non-finite values (unwritten or overflowed elements)"
    x, ref = x.double(), ref.double()
    # floor on the denominator: a gradient that is exactly zero in the reference (dA at L = 1) is compared
    # in absolute terms instead of blowing up on rounding noise
    return ((x - ref).norm() / ref.norm().clamp_min(1e-3)).item()


def triton_mod():
    """The Triton backend, poisoned (NaN-filled outputs), or skip when it cannot run here."""
    if not (CUDA or INTERPRET):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    try:
        from vim_kernels import triton_scan
    except ImportError:
        pytest.skip("triton is not importable")
    if not CUDA and not triton_scan._INTERPRET:
        pytest.skip("vim_kernels.triton_scan was imported before TRITON_INTERPRET was set")
    triton_scan.POISON = True
    return triton_scan


def scan_inputs(batch, dim, L, N, dtype, device, channel_last=True, seed=0):
    """Fresh random inputs as the model makes them: delta > 0 after softplus, A = -exp(rand) < 0, no zeros."""
    g = torch.Generator().manual_seed(seed)

    def act(scale=1.0):
        shape = (batch, L, dim) if channel_last else (batch, dim, L)
        x = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
        return x.transpose(1, 2) if channel_last else x

    u, delta, z = act(), act(0.5), act()
    A = -torch.exp(torch.rand(dim, N, generator=g)).to(device)
    B = torch.randn(batch, L, N, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    C = torch.randn(batch, L, N, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    D = torch.randn(dim, generator=g).to(device)
    delta_bias = (torch.rand(dim, generator=g) - 1.0).to(device)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def route_inputs(R, batch, dim, L, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return dict(
        u=rnd(R, batch, L, dim),
        delta=rnd(R, batch, L, dim, scale=0.5),
        A=-torch.exp(torch.rand(R, dim, N, generator=g)).to(device),
        B=rnd(R, batch, L, N),
        C=rnd(R, batch, L, N),
        D=torch.randn(R, dim, generator=g).to(device),
        z=rnd(batch, L, dim),
        delta_bias=(torch.rand(R, dim, generator=g) - 1.0).to(device),
    )


def run_scan(fn, inputs, grad_out, **kw):
    """Forward + backward; returns (out, last_state or None, {name: grad})."""
    xs = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    res = fn(**xs, **kw)
    out, last = res if isinstance(res, tuple) else (res, None)
    (out.float() * grad_out).sum().backward()
    return out.detach(), last, {k: v.grad for k, v in xs.items() if v is not None}


def check_against_ref(inputs, fn, tol_out, tol_grad, **kw):
    u = inputs["u"]
    grad_out = torch.randn(u.shape, device=u.device)
    out, last, grads = run_scan(fn, inputs, grad_out, **kw)
    ref_in = {k: (v.float() if v is not None and v.dtype != torch.float32 else v) for k, v in inputs.items()}
    ref_out, ref_last, ref_grads = run_scan(vk.selective_scan_ref, ref_in, grad_out, **kw)
    assert out.dtype == u.dtype and out.shape == u.shape
    assert rel_err(out, ref_out) < tol_out
    if last is not None:
        assert rel_err(last, ref_last) < tol_out
    for k, g in ref_grads.items():
        assert grads[k].shape == inputs[k].shape, k
        assert rel_err(grads[k], g) < tol_grad, k


TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 2e-2)}


# ---- torch backend (CPU, fast) -------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 2, 7, 16, 49])
def test_torch_matches_ref(L):
    inputs = scan_inputs(2, 5, L, 4, torch.float32, "cpu")
    check_against_ref(inputs, vk.selective_scan_torch, *TOL[torch.float32], delta_softplus=True, return_last_state=True)


def test_torch_options_and_layouts():
    inputs = scan_inputs(2, 5, 23, 3, torch.float32, "cpu", channel_last=False)
    inputs.update(D=None, z=None, delta_bias=None)
    check_against_ref(inputs, vk.selective_scan_torch, *TOL[torch.float32], delta_softplus=False)


def test_torch_bf16():
    inputs = scan_inputs(2, 6, 31, 4, torch.bfloat16, "cpu")
    check_against_ref(inputs, vk.selective_scan_torch, *TOL[torch.bfloat16], delta_softplus=True)


def test_torch_no_overflow_for_large_decay():
    # delta*|A| of ~100 per step: exp(-cumsum) formulations overflow here; segment differences do not
    inputs = scan_inputs(2, 4, 40, 4, torch.float32, "cpu")
    inputs["delta"] = inputs["delta"].abs() * 0 + 60.0
    inputs["A"] = inputs["A"] * 2
    check_against_ref(inputs, vk.selective_scan_torch, *TOL[torch.float32], delta_softplus=True)


def test_dispatch_and_backends():
    assert {"ref", "torch"} <= set(vk.available_backends("cpu"))
    assert "triton" not in vk.available_backends("cpu")
    assert vk.best_backend("cpu") == "torch"
    inputs = scan_inputs(1, 3, 5, 2, torch.float32, "cpu")
    out = vk.selective_scan(**inputs, delta_softplus=True, backend="torch")
    ref = vk.selective_scan(**inputs, delta_softplus=True, backend="ref")
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError):
        vk.selective_scan(**inputs, backend="cuda")


def _random_routes(R, L, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=g) for _ in range(R)]).to(device)


def _bidir_routes(L, device):
    ar = torch.arange(L, device=device)
    return torch.stack([ar, ar.flip(0)])


def check_routes(inputs, routes, backend, tol_out, tol_grad):
    grad_out = torch.randn(inputs["z"].shape, device=inputs["u"].device)

    def fn(**kw):
        return vk.multi_route_selective_scan(**kw, routes=routes, delta_softplus=True, backend=backend)

    def ref(**kw):
        return vk.multi_route_selective_scan_ref(**kw, routes=routes, delta_softplus=True)

    out, _, grads = run_scan(fn, inputs, grad_out)
    ref_in = {k: (v.float() if v.dtype != torch.float32 else v) for k, v in inputs.items()}
    ref_out, _, ref_grads = run_scan(ref, ref_in, grad_out)
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["z"].shape
    assert rel_err(out, ref_out) < tol_out
    for k, g in ref_grads.items():
        assert rel_err(grads[k], g) < tol_grad, k


@pytest.mark.parametrize("R", [2, 4])
def test_torch_multi_route(R):
    inputs = route_inputs(R, 2, 5, 13, 4, torch.float32, "cpu")
    routes = _bidir_routes(13, "cpu") if R == 2 else _random_routes(R, 13, "cpu")
    check_routes(inputs, routes, "torch", *TOL[torch.float32])


def _bidir_v2(inputs):
    """Vim v2's formulation: forward scan, plus the flip of a scan on flipped inputs; mean; gate."""
    inp = inputs
    fwd = vk.selective_scan_ref(
        inp["u"][0].transpose(1, 2), inp["delta"][0].transpose(1, 2), inp["A"][0], inp["B"][0].transpose(1, 2),
        inp["C"][0].transpose(1, 2), inp["D"][0], None, inp["delta_bias"][0], delta_softplus=True,
    )  # fmt: skip
    bwd = vk.selective_scan_ref(
        inp["u"][1].flip(1).transpose(1, 2), inp["delta"][1].flip(1).transpose(1, 2), inp["A"][1],
        inp["B"][1].flip(1).transpose(1, 2), inp["C"][1].flip(1).transpose(1, 2), inp["D"][1], None,
        inp["delta_bias"][1], delta_softplus=True,
    ).flip(2)  # fmt: skip
    return ((fwd + bwd) / 2).transpose(1, 2) * torch.nn.functional.silu(inp["z"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bidirectional_equals_two_flipped_scans(backend):
    if backend == "triton":
        triton_mod()
    dev = "cuda" if CUDA else "cpu"
    inputs = route_inputs(2, 1, 4 if not CUDA else 64, 10, 4, torch.float32, dev)
    out = vk.bidirectional_selective_scan(**inputs, delta_softplus=True, backend=backend)
    assert rel_err(out, _bidir_v2(inputs)) < 1e-4


# ---- Triton backend: interpreted on CPU with tiny grids (chunk T = 4, 4 channels per program) ----------------
# (L, dim): 1, 2, odd over several chunks, an exact multiple of the chunk, several chunks with two channel blocks
@pytest.mark.parametrize("L,dim", [(1, 4), (2, 4), (9, 4), (8, 3), (13, 6)])
def test_triton_matches_ref_small(L, dim):
    triton_mod()
    dev = "cuda" if CUDA else "cpu"
    inputs = scan_inputs(2 if L < 9 else 1, dim, L, 4, torch.float32, dev, seed=L)
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=True, return_last_state=True)


def test_triton_options_layout_padding():
    # no D / z / bias, no softplus, contiguous (batch, dim, L) input, N = 3 padded to 4
    triton_mod()
    dev = "cuda" if CUDA else "cpu"
    inputs = scan_inputs(1, 4, 7, 3, torch.float32, dev, channel_last=False)
    inputs.update(D=None, z=None, delta_bias=None)
    inputs["delta"] = inputs["delta"].abs()
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=False)


@pytest.fixture
def seq_forward():
    """Run the Triton forward as the one-step-per-iteration kernel for the duration of a test."""
    mod = triton_mod()
    saved = dict(mod.CONFIG["fwd"])
    mod.CONFIG["fwd"]["kind"] = "seq"
    yield
    mod.CONFIG["fwd"] = saved


# forward kernel, backward kernel, chunk length T, backward sub-chunks; "auto" picks by grid size, so the tests
# name each kind explicitly (the GPU tests' small grids would otherwise only ever run the chunked kernels)
KERNEL_KINDS = {
    "seq/seq T4": ({"kind": "seq", "T": 4, "BD": 32, "num_warps": 1}, {"kind": "seq", "T": 4, "SUBS": 1}),
    # the backward's rows loaded step by step, its sub-chunks unrolled (the defaults before AHEAD and FLAT)
    "seq/seq T8 SUBS2 unrolled AHEAD0": (
        {"kind": "seq", "T": 8, "BD": 32, "num_warps": 1},
        {"kind": "seq", "T": 8, "SUBS": 2, "FLAT": False, "AHEAD": 0},
    ),
    "chunk/chunk T8": (
        {"kind": "chunk", "T": 8, "BD": 16, "num_warps": 2},
        {"kind": "chunk", "T": 8, "BD": 32, "num_warps": 4},
    ),
    # fewer channels than lanes: 32 / BD lanes share a channel (its states split between them)
    "seq BD4/chunk T8": (
        {"kind": "seq", "T": 8, "BD": 4, "num_warps": 1},
        {"kind": "chunk", "T": 8, "BD": 32, "num_warps": 4},
    ),
    "seq/seq BD8 T8 SUBS2": ({"kind": "seq", "T": 8, "BD": 8, "num_warps": 1}, {"kind": "seq", "SUBS": 2, "BD": 8}),
    # four steps in flight, L2 prefetch 16 steps ahead; the chunked kernels with their prefetch
    "seq D4 P16/seq T8": (
        {"kind": "seq", "T": 8, "BD": 8, "num_warps": 1, "DEPTH": 4, "PREFETCH": 16},
        {"kind": "seq", "SUBS": 2},
    ),
    "chunk/chunk T8 prefetch": (
        {"kind": "chunk", "T": 8, "BD": 16, "num_warps": 2, "PREFETCH": 1},
        {"kind": "chunk", "T": 8, "BD": 32, "num_warps": 4, "PREFETCH": 1},
    ),
    # the compiler's own layout of the state tile (PIN off, see _state_offsets); the large-grid defaults at T 4
    "seq/seq T4 unpinned": (
        {"kind": "seq", "T": 4, "BD": 32, "num_warps": 1, "PIN": False},
        {"kind": "seq", "T": 4, "SUBS": 1, "PIN": False},
    ),
    # the large-grid defaults: T 4, and T 8 with one sub-chunk per loop iteration (FLAT), both capped at 168
    # registers, the backward's rows loaded a sub-chunk at a time (AHEAD 1)
    "seq D4/seq T4 maxnreg168": (
        {"kind": "seq", "T": 4, "BD": 32, "num_warps": 1, "DEPTH": 4},
        {"kind": "seq", "T": 4, "SUBS": 1, "maxnreg": 168, "AHEAD": 1},
    ),
    "seq T8/seq T8 SUBS2 FLAT maxnreg168": (
        {"kind": "seq", "T": 8, "BD": 32, "num_warps": 1, "DEPTH": 4},
        {"kind": "seq", "SUBS": 2, "FLAT": True, "maxnreg": 168, "AHEAD": 1},
    ),
    # the backward's other row loads (see INTERPRET_KINDS), under the register caps they were timed with
    "seq D4/seq T4 AHEAD2 maxnreg184": (
        {"kind": "seq", "T": 4, "BD": 32, "num_warps": 1, "DEPTH": 4},
        {"kind": "seq", "T": 4, "SUBS": 1, "AHEAD": 2, "maxnreg": 184},
    ),
    "seq D4/seq T4 AHEAD3 maxnreg168": (
        {"kind": "seq", "T": 4, "BD": 32, "num_warps": 1, "DEPTH": 4},
        {"kind": "seq", "T": 4, "SUBS": 1, "AHEAD": 3, "maxnreg": 168},
    ),
    "split SEG64/seq SEG64 T8 FLAT AHEAD2 maxnreg168": (
        {"kind": "split", "T": 8, "SEG": 64, "BD": 32, "num_warps": 1, "PREFETCH": 16},
        {"kind": "seq", "SUBS": 2, "SEG": 64, "FLAT": True, "AHEAD": 2, "maxnreg": 168},
    ),
    # L split into segments of 64 steps (the small-grid default uses 256)
    "split SEG64/chunk T8": (
        {"kind": "split", "T": 8, "SEG": 64, "BD": 32, "num_warps": 1, "PREFETCH": 16},
        {"kind": "chunk", "T": 8, "BD": 32, "num_warps": 4, "PREFETCH": 1},
    ),
    "split SEG64/seq SEG64 T8": (
        {"kind": "split", "T": 8, "SEG": 64, "BD": 32, "num_warps": 1, "PREFETCH": 16},
        {"kind": "seq", "SUBS": 2, "SEG": 64},
    ),
}
INTERPRET_KINDS = {  # tiny tiles under the interpreter; unset keys keep CONFIG's (FLAT "auto", AHEAD 1)
    "seq/seq T4 SUBS2": ({"kind": "seq", "T": 4, "BD": 32, "num_warps": 1}, {"kind": "seq", "T": 4, "SUBS": 2}),
    "seq/seq T4 SUBS2 unrolled AHEAD0": (
        {"kind": "seq", "T": 4, "BD": 32, "num_warps": 1},
        {"kind": "seq", "T": 4, "SUBS": 2, "FLAT": False, "AHEAD": 0},
    ),
    "seq D4/seq T4": ({"kind": "seq", "T": 4, "BD": 32, "num_warps": 1, "DEPTH": 4}, {"kind": "seq", "SUBS": 1}),
    "chunk/chunk T4": ({"kind": "chunk", "T": 4, "BD": 4, "num_warps": 1}, {"kind": "chunk", "T": 4, "BD": 4}),
    # L split into segments of 4 steps (see _scan_fwd_split_kernel)
    "split/seq T4": (
        {"kind": "split", "T": 4, "SEG": 4, "BD": 32, "num_warps": 1},
        {"kind": "seq", "SUBS": 1, "SEG": 4},  # the backward split too
    ),
    # one sub-chunk per iteration of the backward's dynamic loop (FLAT), unsplit and split
    "seq/seq T4 SUBS2 FLAT AHEAD0": (
        {"kind": "seq", "T": 4, "BD": 32, "num_warps": 1},
        {"kind": "seq", "T": 4, "SUBS": 2, "FLAT": True, "AHEAD": 0},
    ),
    "split/seq T4 SUBS2 FLAT AHEAD0": (
        {"kind": "split", "T": 4, "SEG": 8, "BD": 32, "num_warps": 1},
        {"kind": "seq", "SUBS": 2, "SEG": 8, "FLAT": True, "AHEAD": 0},
    ),
    # the backward's rows loaded ahead (AHEAD 1, the default: a sub-chunk's at its start; 2: the next sub-chunk's
    # during this one, across the unrolled sub-chunks, the loop and, split, past the segment's first chunk)
    "seq/seq T4 SUBS2 unrolled AHEAD2": (
        {"kind": "seq", "T": 4, "BD": 32, "num_warps": 1},
        {"kind": "seq", "T": 4, "SUBS": 2, "FLAT": False, "AHEAD": 2},
    ),
    "split/seq T4 SUBS2 FLAT AHEAD1": (
        {"kind": "split", "T": 4, "SEG": 8, "BD": 32, "num_warps": 1},
        {"kind": "seq", "SUBS": 2, "SEG": 8, "FLAT": True, "AHEAD": 1},
    ),
    "split/seq T4 AHEAD2": (
        {"kind": "split", "T": 4, "SEG": 4, "BD": 32, "num_warps": 1},
        {"kind": "seq", "SUBS": 1, "SEG": 4, "AHEAD": 2},
    ),
}


@pytest.fixture
def kernel_kinds(request):
    """Set CONFIG to one (forward, backward) kernel pair from KERNEL_KINDS / INTERPRET_KINDS for a test."""
    mod = triton_mod()
    saved = {k: dict(v) for k, v in mod.CONFIG.items()}
    fwd, bwd = {**INTERPRET_KINDS, **KERNEL_KINDS}[request.param]  # the tiny pairs run on a GPU as well
    mod.CONFIG["fwd"] = {**saved["fwd"], **fwd}
    mod.CONFIG["bwd"] = {**saved["bwd"], **bwd}
    yield
    mod.CONFIG.update(saved)


@pytest.mark.parametrize("L,dim", [(1, 4), (9, 6)])
def test_triton_seq_forward_small(L, dim, seq_forward):
    dev = "cuda" if CUDA else "cpu"
    inputs = scan_inputs(1, dim, L, 4, torch.float32, dev, seed=L)
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=True, return_last_state=True)


def test_triton_seq_forward_routes(seq_forward):
    dev = "cuda" if CUDA else "cpu"
    inputs = route_inputs(3, 1, 4, 7, 4, torch.float32, dev, seed=3)
    check_routes(inputs, _random_routes(3, 7, dev), "triton", *TOL[torch.float32])


def check_kind_small(N, seed):
    """One kernel pair (set by the kernel_kinds fixture) on tiny single- and multi-route inputs with N states."""
    dev = "cuda" if CUDA else "cpu"
    inputs = scan_inputs(1, 6, 11, N, torch.float32, dev, seed=seed)
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=True, return_last_state=True)
    inputs = route_inputs(2, 1, 4, 7, N, torch.float32, dev, seed=seed + 1)
    check_routes(inputs, _random_routes(2, 7, dev), "triton", *TOL[torch.float32])


@pytest.mark.parametrize("kernel_kinds", list(INTERPRET_KINDS), indirect=True)
def test_triton_kernel_kinds_small(kernel_kinds):
    check_kind_small(4, seed=11)


# the other interpreter tests use N 4 (fast); Vim's N 16 fills the 32 lanes of the backward's reduce-scatter with
# 16 rows (_lane_sum: 4 halving rounds and a pairing one, against 2 and 3 at N 4)
@pytest.mark.parametrize(
    "kernel_kinds",
    ["seq/seq T4 SUBS2", "seq/seq T4 SUBS2 unrolled AHEAD2", "split/seq T4 SUBS2 FLAT AHEAD1"],
    indirect=True,
)
def test_triton_kernel_kinds_16_states(kernel_kinds):
    check_kind_small(16, seed=16)


def test_triton_bf16_small():
    triton_mod()
    dev = "cuda" if CUDA else "cpu"
    inputs = scan_inputs(1, 4, 10, 4, torch.bfloat16, dev)
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.bfloat16], delta_softplus=True)


@pytest.mark.parametrize("R", [2, 4])
def test_triton_multi_route_small(R):
    triton_mod()
    dev = "cuda" if CUDA else "cpu"
    L = 9 if R == 2 else 6
    inputs = route_inputs(R, 1, 4, L, 4, torch.float32, dev, seed=R)
    routes = _bidir_routes(L, dev) if R == 2 else _random_routes(R, L, dev)
    check_routes(inputs, routes, "triton", *TOL[torch.float32])


def check_fused_dt_proj(R, batch, dim, L, N, rank, dtype, device, tol, seed=0):
    """The forward-only multi-route scan with dt_proj formed in the kernel (and its output written over z) against
    the reference fed delta = dt_low @ dt_proj^T; the interface must pick the fused path (can_fuse_dt_proj)."""
    mod = triton_mod()
    inputs = route_inputs(R, batch, dim, L, N, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    # the low-rank input is a view of x_proj's wider output in the model: a non-unit row stride
    dt_low = (torch.randn(R, batch, L, rank + 2 * N, generator=g) * 0.3).to(device=device, dtype=dtype)[..., :rank]
    dt_proj = (torch.randn(R, dim, rank, generator=g) * rank**-0.5).to(device)
    routes = _bidir_routes(L, device) if R == 2 else _random_routes(R, L, device, seed=seed)
    assert mod.can_fuse_dt_proj(batch, dim, R, L, N, rank)
    ref_in = {k: v.float() for k, v in inputs.items()}
    ref_in["delta"] = dt_low.float() @ dt_proj.transpose(1, 2).unsqueeze(1)
    ref = vk.multi_route_selective_scan_ref(**ref_in, routes=routes, delta_softplus=True)
    with torch.no_grad():
        args = {k: v for k, v in inputs.items() if k != "delta"}
        z = args.pop("z")
        zc = z.clone()
        out = vk.multi_route_selective_scan(
            **args, z=zc, delta=dt_low, routes=routes, delta_proj=dt_proj, out=zc, backend="triton"
        )
        unfused = vk.multi_route_selective_scan(
            **args, z=z, delta=dt_low, routes=routes, delta_proj=dt_proj, backend="torch"
        )
    assert out.data_ptr() == zc.data_ptr() and out.dtype == dtype
    assert rel_err(out, ref) < tol
    assert rel_err(unfused, ref) < tol  # the matmul path of the same API


@pytest.mark.parametrize("kernel_kinds", ["seq/seq T4 SUBS2", "seq D4/seq T4", "split/seq T4"], indirect=True)
def test_triton_fused_dt_proj_small(kernel_kinds):
    dev = "cuda" if CUDA else "cpu"
    check_fused_dt_proj(2, 1, 5, 11, 4, 3, torch.float32, dev, TOL[torch.float32][0], seed=7)


def test_triton_fused_dt_proj_bf16_and_odd_states(seq_forward):
    # bf16 activations with a float32 dt_proj (the model's dtypes under autocast); N 3: padded states and rows
    dev = "cuda" if CUDA else "cpu"
    check_fused_dt_proj(2, 1, 5, 9, 3, 5, torch.bfloat16, dev, TOL[torch.bfloat16][0], seed=9)


def check_projected(R, batch, dim, L, N, rank, dtype, device, tol, seed=0):
    """The mixer's inference path: x_proj through project_scan_inputs (rows written in the scan's packed layout,
    taken without a copy when N is a power of two), then the fused dt_proj scan with its output over z, against the
    reference fed the same projections."""
    mod = triton_mod()
    inputs = route_inputs(R, batch, dim, L, N, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 200)
    w_x = (torch.randn(R, rank + 2 * N, dim, generator=g) * dim**-0.5).to(device=device, dtype=dtype)
    dt_proj = (torch.randn(R, dim, rank, generator=g) * rank**-0.5).to(device)
    routes = _bidir_routes(L, device) if R == 2 else _random_routes(R, L, device, seed=seed)
    u = inputs["u"]
    assert mod.can_fuse_dt_proj(batch, dim, R, L, N, rank)
    with torch.no_grad():
        dt_low, B, C = vk.project_scan_inputs(u, w_x, rank, N, backend="triton")
        # the views carry x_proj's values ([dt | B | C] in Mamba's row order)...
        x_dbl = torch.matmul(u.float(), w_x.float().transpose(1, 2).unsqueeze(1))
        for got, want in zip((dt_low, B, C), torch.split(x_dbl, [rank, N, N], dim=-1)):
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        # ...and are the scan's packed rows themselves when no state padding is needed
        rows = mod._pack(inputs["A"].float(), B, C, dt_low, dtype)[1]
        assert (rows.data_ptr() == B.data_ptr()) == (N == mod._np(N))
        args = {k: v for k, v in inputs.items() if k not in ("delta", "B", "C", "z")}
        z = inputs["z"].clone()
        out = vk.multi_route_selective_scan(
            **args, z=z, delta=dt_low, B=B, C=C, routes=routes, delta_proj=dt_proj, out=z, backend="triton"
        )
    assert out.data_ptr() == z.data_ptr() and out.dtype == dtype
    ref_in = {k: v.float() for k, v in inputs.items()}
    ref_in.update(B=B.float(), C=C.float(), delta=dt_low.float() @ dt_proj.transpose(1, 2).unsqueeze(1))
    ref = vk.multi_route_selective_scan_ref(**ref_in, routes=routes, delta_softplus=True)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("kernel_kinds", ["seq D4/seq T4", "split/seq T4"], indirect=True)
def test_triton_projected_rows_small(kernel_kinds):
    dev = "cuda" if CUDA else "cpu"
    check_projected(2, 1, 5, 11, 4, 3, torch.float32, dev, TOL[torch.float32][0], seed=5)


def test_projected_rows_only_where_the_scan_reads_them(seq_forward):
    # a rank above DT_PROJ_MAX_RANK (delta formed by a matmul), or gradients: x_proj's plain [dt | B | C] output
    mod = triton_mod()
    dev = "cuda" if CUDA else "cpu"
    N, u = 4, torch.randn(2, 1, 5, 8, device=dev)
    for rank, grad in ((mod.DT_PROJ_MAX_RANK + 1, False), (3, True)):
        w_x = torch.randn(2, rank + 2 * N, 8, device=dev, requires_grad=grad)
        want = torch.split(torch.matmul(u, w_x.transpose(1, 2).unsqueeze(1)), [rank, N, N], dim=-1)
        got = vk.project_scan_inputs(u, w_x, rank, N, backend="triton")
        assert got[1].stride(-2) == rank + 2 * N  # rows of x_proj's own width: not packed
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_triton_projected_rows_odd_states_bf16(seq_forward):
    # N 3: the rows need state padding, so the scan packs a copy; bf16 as under autocast
    dev = "cuda" if CUDA else "cpu"
    check_projected(2, 1, 5, 7, 3, 2, torch.bfloat16, dev, TOL[torch.bfloat16][0], seed=6)


def test_fused_dt_proj_falls_back_to_a_matmul_with_gradients():
    # gradients needed: delta is formed by a matmul and the autograd scan runs (torch backend here); same values
    inputs = route_inputs(2, 1, 5, 9, 4, torch.float32, "cpu", seed=3)
    dt_low = torch.randn(2, 1, 9, 3).requires_grad_()
    dt_proj = torch.randn(2, 5, 3)
    routes = _bidir_routes(9, "cpu")
    args = {k: v for k, v in inputs.items() if k != "delta"}
    out = vk.multi_route_selective_scan(**args, delta=dt_low, routes=routes, delta_proj=dt_proj, backend="torch")
    ref = vk.multi_route_selective_scan_ref(**args, delta=dt_low @ dt_proj.transpose(1, 2).unsqueeze(1), routes=routes)
    assert rel_err(out, ref) < 1e-5
    out.sum().backward()
    assert dt_low.grad is not None and torch.isfinite(dt_low.grad).all()
    with pytest.raises(ValueError, match="delta_proj"):
        vk.multi_route_selective_scan(**args, delta=dt_low, routes=routes, delta_proj=dt_proj[:, :4], backend="torch")
    with pytest.raises(ValueError, match="out= is for the Triton backend"):
        vk.multi_route_selective_scan(**inputs, routes=routes, out=inputs["z"], backend="torch")


# ---- real shapes on the GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [2, 48])  # a small grid (split L) and a large one (one-step forward)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_fused_dt_proj(batch, dtype):
    # vim_tiny's mixer: E 384, N 16, dt_rank 12, both directions; L 785 splits into segments on the small grid
    check_fused_dt_proj(2, batch, 384, 785, 16, 12, dtype, "cuda", TOL[dtype][0], seed=batch)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [2, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_projected_rows(batch, dtype):
    # the mixer's inference path at vim_tiny's shapes (L 785: segments on the small grid, 4 of them)
    check_projected(2, batch, 384, 785, 16, 12, dtype, "cuda", TOL[dtype][0], seed=batch)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 2, 63, 197, 256, 785])
def test_triton_gpu_shapes(L, dtype):
    triton_mod()
    inputs = scan_inputs(2, 200, L, 16, dtype, "cuda", seed=L)
    check_against_ref(inputs, vk.selective_scan, *TOL[dtype], delta_softplus=True, return_last_state=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kernel_kinds", list(KERNEL_KINDS), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 2, 197, 785])
def test_triton_gpu_kernel_kinds(L, dtype, kernel_kinds):
    inputs = scan_inputs(2, 200, L, 16, dtype, "cuda", seed=L)
    check_against_ref(inputs, vk.selective_scan, *TOL[dtype], delta_softplus=True, return_last_state=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kernel_kinds", list(KERNEL_KINDS), indirect=True)
@pytest.mark.parametrize("R", [2, 4])
def test_triton_gpu_multi_route_kinds(R, kernel_kinds):
    L = 197
    inputs = route_inputs(R, 2, 192, L, 16, torch.bfloat16, "cuda", seed=R)
    routes = _bidir_routes(L, "cuda") if R == 2 else _random_routes(R, L, "cuda")
    check_routes(inputs, routes, "triton", *TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_gpu_contiguous_layout():
    triton_mod()
    inputs = scan_inputs(2, 96, 197, 16, torch.float32, "cuda", channel_last=False)
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [2, 4])
def test_triton_gpu_multi_route(R, dtype):
    triton_mod()
    L = 197
    inputs = route_inputs(R, 2, 192, L, 16, dtype, "cuda", seed=R)
    routes = _bidir_routes(L, "cuda") if R == 2 else _random_routes(R, L, "cuda")
    check_routes(inputs, routes, "triton", *TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_torch_backend_gpu():
    inputs = scan_inputs(2, 64, 197, 16, torch.float32, "cuda")
    check_against_ref(inputs, vk.selective_scan_torch, *TOL[torch.float32], delta_softplus=True)


def test_auto_chunk_length_follows_the_saved_state_budget():
    # T "auto": 4 while the saved chunk states (R, batch, L/T, 16, dim) fp32 fit the budget, else 8 (half the memory);
    # small grids split L into segments
    mod = triton_mod()
    saved = dict(mod.CONFIG["fwd"])
    try:
        mod.CONFIG["fwd"] = {"kind": "auto", "T": "auto", "BD": 32, "num_warps": 1}
        assert mod._fwd_config(128, 768, 1, 197, 16)["T"] == 4  # 315 MB
        assert mod._fwd_config(128, 768, 2, 197, 16)["T"] == 8  # Vim-S: both directions, 629 MB at T 4
        small = mod._fwd_config(16, 384, 1, 6085, 16)  # 192 programs of 32 channels: the small-grid settings
        assert small["kind"] == "split" and small["T"] == mod._FWD_SMALL_GRID["T"]
        assert mod._fwd_config(1, 384, 2, 197, 16)["kind"] == "seq"  # a small grid, but L <= SEG: no split
        mod.CONFIG["fwd"] = {"kind": "seq", "T": 6, "BD": 32, "num_warps": 1, "DEPTH": 4}
        assert mod._fwd_config(1, 64, 1, 50, 16)["DEPTH"] == 2  # DEPTH must divide T
    finally:
        mod.CONFIG["fwd"] = saved


@pytest.mark.parametrize("value,message", [('{"fwd": {"T": 4', "is not JSON"), ('{"forward": {}}', "must be one of")])
def test_bad_scan_config_override_is_a_clear_error(value, message):
    env = {**os.environ, "VIM_SCAN_CONFIG": value, "TRITON_INTERPRET": "1"}
    p = subprocess.run(
        [sys.executable, "-c", "import vim_kernels.triton_scan"], env=env, capture_output=True, text=True
    )
    assert p.returncode != 0 and message in p.stderr.splitlines()[-1]


def test_backward_config_follows_the_forward_chunks():
    # the backward takes the forward's T; "auto" runs a chunk of several sub-chunks one per loop iteration (FLAT)
    # and then caps registers; with the sub-chunks unrolled the cap spills (slower on the GPU), so it is left off;
    # small grids split L like the forward
    mod = triton_mod()
    saved = dict(mod.CONFIG["bwd"])
    try:
        auto = {"kind": "auto", "SUBS": "auto", "BD": 32, "num_warps": 1, "maxnreg": "auto", "FLAT": "auto"}
        mod.CONFIG["bwd"] = dict(auto)
        t4, t8 = mod._bwd_config(128, 768, 1, 4), mod._bwd_config(128, 768, 2, 8)
        assert (t4["kind"], t4["T"], t4["SUBS"], t4["FLAT"], t4["maxnreg"]) == ("seq", 4, 1, False, 168)
        assert (t8["T"], t8["SUBS"], t8["FLAT"], t8["maxnreg"]) == (8, 2, True, 168)
        small = mod._bwd_config(16, 384, 1, 8)
        assert small["SEG"] == mod._BWD_SMALL_GRID["SEG"] and small["FLAT"] and small["maxnreg"] == 168
        mod.CONFIG["bwd"] = {**auto, "FLAT": False}
        assert mod._bwd_config(128, 768, 2, 8)["maxnreg"] is None
    finally:
        mod.CONFIG["bwd"] = saved
