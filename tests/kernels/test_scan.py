"""Selective-scan backends (torch, Triton) and the multi-route entry points against the sequential reference.

The Triton kernels run what select_config picks for a shape (the GPU defaults); under the interpreter (CPU) with
tiny grids, the same kinds are named explicitly with short segments, so every launched kernel runs here too.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import vim_kernels as vk
from vim_kernels import ScanConfig, select_config

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if CUDA else "cpu"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN/inf anywhere fails."""
    assert torch.isfinite(x).all(), "non-finite values (unwritten or overflowed elements)"
    x, ref = x.double(), ref.double()
    # floor on the denominator: a gradient that is exactly zero in the reference (dA at L = 1) is compared
    # in absolute terms instead of blowing up on rounding noise
    return ((x - ref).norm() / ref.norm().clamp_min(1e-3)).item()


@pytest.fixture
def triton_here():
    if not (CUDA or INTERPRET):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    if not vk.HAS_TRITON:
        pytest.skip("triton is not installed")


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
    """Forward + backward of a sum loss; returns (out, last_state or None, {name: grad})."""
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
    kw.pop("config", None)
    kw.pop("backend", None)
    ref_out, ref_last, ref_grads = run_scan(vk.selective_scan_ref, ref_in, grad_out, **kw)
    assert out.dtype == u.dtype and out.shape == u.shape
    assert rel_err(out, ref_out) < tol_out
    if last is not None:
        assert rel_err(last, ref_last) < tol_out
    for k, g in ref_grads.items():
        assert grads[k].shape == inputs[k].shape, k
        assert rel_err(grads[k], g) < tol_grad, k


# measured: float32 ~3e-7 (outputs and gradients), bf16 inputs ~4e-3
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def random_routes(R, L, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=g) for _ in range(R)]).to(device)


def bidir_routes(L, device):
    ar = torch.arange(L, device=device)
    return torch.stack([ar, ar.flip(0)])


def check_routes(inputs, routes, backend, tol_out, tol_grad, config=None):
    grad_out = torch.randn(inputs["z"].shape, device=inputs["u"].device)

    def fn(**kw):
        extra = {"config": config} if config is not None else {}
        return vk.multi_route_selective_scan(**kw, routes=routes, delta_softplus=True, backend=backend, **extra)

    def ref(**kw):
        return vk.multi_route_selective_scan_ref(**kw, routes=routes, delta_softplus=True)

    out, _, grads = run_scan(fn, inputs, grad_out)
    ref_in = {k: (v.float() if v.dtype != torch.float32 else v) for k, v in inputs.items()}
    ref_out, _, ref_grads = run_scan(ref, ref_in, grad_out)
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["z"].shape
    assert rel_err(out, ref_out) < tol_out
    for k, g in ref_grads.items():
        assert rel_err(grads[k], g) < tol_grad, k


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
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.selective_scan(**inputs, backend="cuda")


@pytest.mark.parametrize("R", [2, 4])
def test_torch_multi_route(R):
    inputs = route_inputs(R, 2, 5, 13, 4, torch.float32, "cpu")
    routes = bidir_routes(13, "cpu") if R == 2 else random_routes(R, 13, "cpu")
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
def test_bidirectional_equals_two_flipped_scans(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_here")
    inputs = route_inputs(2, 1, 4 if not CUDA else 64, 10, 4, torch.float32, DEV)
    out = vk.bidirectional_selective_scan(**inputs, delta_softplus=True, backend=backend)
    assert rel_err(out, _bidir_v2(inputs)) < 1e-5


# ---- the launch choice ---------------------------------------------------------------------------------------
def test_select_config_follows_the_grid_and_the_state_budget():
    h100 = "cpu"  # the interpreter takes an H100's choices (132 multiprocessors)
    # large grids: one-step kernels, states every 4 steps while they fit the budget, else every 8 (half the memory)
    assert select_config(128, 768, 1, 197, 16, True, h100) == ScanConfig("seq", "seq", 4, 1, dt_proj_max_rank=0)
    assert select_config(128, 768, 2, 197, 16, True, h100) == ScanConfig("seq", "seq", 8, 2, dt_proj_max_rank=0)
    # small grids (16 x 2 x 12 programs): L split into segments of 256 with an L2 prefetch; short L unsplit
    small = select_config(16, 384, 2, 6085, 16, False, h100)
    assert (small.fwd, small.bwd, small.chunk, small.seg, small.prefetch) == ("split", "split", 8, 256, 16)
    assert select_config(1, 384, 2, 197, 16, False, h100).fwd == "seq"
    # delta formed in the kernel only without gradients
    assert small.dt_proj_max_rank == 16 and select_config(16, 384, 2, 6085, 16, True, h100).dt_proj_max_rank == 0
    assert ScanConfig.decode(small.encode()) == small


@pytest.mark.parametrize(
    "fields,message",
    [(dict(chunk=6), "multiple of 4"), (dict(chunk=8, seg=12), "multiple of chunk"), (dict(fwd="chunk"), "'seq'")],
)
def test_scan_config_rejects_impossible_choices(fields, message):
    with pytest.raises(ValueError, match=message):
        ScanConfig(**fields)


# ---- Triton: the kinds the GPU defaults launch, interpreted on tiny grids ---------------------------------------
# the large-grid defaults (chunk 4; chunk 8 in two sub-chunks), the small-grid default with short segments (the
# two-launch forward and backward), and the small-grid unsplit case (the one-step kernels with the L2 prefetch)
KINDS = {
    "seq T4": ScanConfig("seq", "seq", 4, 1),
    "seq T8 SUBS2": ScanConfig("seq", "seq", 8, 2),
    "split T8 SUBS2 SEG8": ScanConfig("split", "split", 8, 2, seg=8, prefetch=16),
    "seq T8 SUBS2 prefetch": ScanConfig("seq", "seq", 8, 2, prefetch=16),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("L", [1, 11, 24])  # one step; not a multiple of the chunk; three segments exactly
def test_triton_kinds_match_ref(triton_here, kind, L):
    inputs = scan_inputs(1, 6, L, 4, torch.float32, DEV, seed=L)
    check_against_ref(
        inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=True, return_last_state=True,
        backend="triton", config=KINDS[kind],
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["seq T8 SUBS2", "split T8 SUBS2 SEG8"])
def test_triton_kinds_with_16_states(triton_here, kind):
    # Vim's N 16 fills the 32 lanes of the backward's reduce-scatter with 16 rows (4 halving rounds + a pairing one)
    inputs = route_inputs(2, 1, 4, 19, 16, torch.float32, DEV, seed=16)
    check_routes(inputs, random_routes(2, 19, DEV), "triton", *TOL[torch.float32], config=KINDS[kind])


def test_triton_default_configs_and_options(triton_here):
    # what select_config picks for tiny grids; no D / z / bias, no softplus, a contiguous (batch, dim, L) input,
    # N = 3 padded to 4; N 64: more states than lanes, the backward's per-row reduction instead of the lane one
    inputs = scan_inputs(1, 4, 7, 3, torch.float32, DEV, channel_last=False)
    inputs.update(D=None, z=None, delta_bias=None)
    inputs["delta"] = inputs["delta"].abs()
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=False, backend="triton")
    inputs = scan_inputs(1, 3, 5, 64, torch.float32, DEV, seed=64)
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.float32], delta_softplus=True, backend="triton")


def test_triton_bf16(triton_here):
    inputs = scan_inputs(1, 4, 10, 4, torch.bfloat16, DEV)
    check_against_ref(inputs, vk.selective_scan, *TOL[torch.bfloat16], delta_softplus=True, backend="triton")


@pytest.mark.parametrize("R", [2, 4])
def test_triton_multi_route(triton_here, R):
    L = 9 if R == 2 else 6
    inputs = route_inputs(R, 1, 4, L, 4, torch.float32, DEV, seed=R)
    routes = bidir_routes(L, DEV) if R == 2 else random_routes(R, L, DEV)
    check_routes(inputs, routes, "triton", *TOL[torch.float32])


# ---- real shapes on the GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 2, 63, 197, 256, 785])
def test_triton_gpu_shapes(L, dtype):
    # batch 2: the small-grid defaults (L > 256 split into segments)
    inputs = scan_inputs(2, 200, L, 16, dtype, "cuda", seed=L)
    check_against_ref(
        inputs, vk.selective_scan, *TOL[dtype], delta_softplus=True, return_last_state=True, backend="triton"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 197, 785])
def test_triton_gpu_kinds(L, dtype, kind):
    cfg = KINDS[kind] if KINDS[kind].fwd == "seq" else replace(KINDS[kind], seg=256)
    inputs = scan_inputs(2, 200, L, 16, dtype, "cuda", seed=L)
    check_against_ref(
        inputs, vk.selective_scan, *TOL[dtype], delta_softplus=True, return_last_state=True, backend="triton",
        config=cfg,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [2, 48])  # a small grid (split L) and a large one (one-step kernels)
@pytest.mark.parametrize("R", [2, 4])
def test_triton_gpu_multi_route(R, batch):
    L = 785
    inputs = route_inputs(R, batch, 192, L, 16, torch.bfloat16, "cuda", seed=R)
    routes = bidir_routes(L, "cuda") if R == 2 else random_routes(R, L, "cuda")
    check_routes(inputs, routes, "triton", *TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_torch_backend_gpu():
    inputs = scan_inputs(2, 64, 197, 16, torch.float32, "cuda")
    check_against_ref(inputs, vk.selective_scan_torch, *TOL[torch.float32], delta_softplus=True)
