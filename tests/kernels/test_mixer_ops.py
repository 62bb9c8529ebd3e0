"""The fused Vim-mixer ops (vim_kernels.mamba_inner, mamba_mixer_inference) against the same function written with
the reference kernels: route conv + SiLU, x_proj, dt_proj, the multi-route scan, mean, silu(z) gate."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import vim_kernels as vk

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not (vk.HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")), reason="Triton needs CUDA or the interpreter"
)
PARAMS = ("conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_bias", "A_log", "D")


def rel_err(x, ref) -> float:
    assert torch.isfinite(x).all()
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def make(R, batch, L, E, N, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    params = dict(
        conv_w=r(R, E, 4, scale=0.5), conv_b=r(R, E, scale=0.1), x_proj_w=r(R, rank + 2 * N, E, scale=E**-0.5),
        dt_proj_w=r(R, E, rank, scale=rank**-0.5), dt_bias=torch.rand(R, E, generator=g) - 4.0,
        A_log=torch.log(torch.arange(1, N + 1).float()).expand(R, E, N) + r(R, E, N, scale=0.1), D=r(R, E),
    )  # fmt: skip
    params = {k: v.to(DEV) for k, v in params.items()}
    ar = torch.arange(L)
    index = (torch.stack([ar, ar.flip(0)]) if R == 2 else torch.stack([torch.randperm(L, generator=g) for _ in range(R)]))
    index = index.to(DEV)
    routes = (index, index.int(), torch.argsort(index, dim=1).int())
    xz = r(batch, L, 2 * E).to(DEV, dtype)
    return params, routes, xz


def reference(xz, p, routes):
    """y (batch, L, E) from in_proj's output xz, in float32 with the reference kernels."""
    index = routes[0]
    E, N, rank = p["conv_w"].shape[1], p["A_log"].shape[-1], p["dt_proj_w"].shape[-1]
    x, z = xz.float()[..., :E], xz.float()[..., E:]
    u = vk.route_conv1d_silu_ref(x, p["conv_w"], p["conv_b"], index)
    dt, B, C = torch.split(torch.matmul(u, p["x_proj_w"].unsqueeze(1).transpose(-1, -2)), [rank, N, N], dim=-1)
    delta = torch.matmul(dt, p["dt_proj_w"].unsqueeze(1).transpose(-1, -2))
    return vk.multi_route_selective_scan_ref(u, delta, -torch.exp(p["A_log"]), B, C, p["D"], z, p["dt_bias"], index)


def check_training(R, batch, L, E, N, rank, dtype, tol, save_states, config=None):
    params, routes, xz = make(R, batch, L, E, N, rank, dtype)
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    x = xz.clone().requires_grad_()
    y = vk.mamba_inner(x[..., :E], x[..., E:], *ps.values(), *routes, save_states=save_states, config=config)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    (y.float() * grad).sum().backward()
    rs = {k: v.clone().requires_grad_() for k, v in params.items()}
    xr = xz.float().clone().requires_grad_()
    ref = reference(xr, rs, routes)
    (ref * grad).sum().backward()
    assert y.dtype == dtype and rel_err(y, ref) < tol
    assert rel_err(x.grad, xr.grad) < tol
    for k in PARAMS:
        assert rel_err(ps[k].grad, rs[k].grad) < tol, k


def check_inference(R, batch, L, E, N, rank, dtype, tol, config=None, dim=24):
    params, routes, _ = make(R, batch, L, E, N, rank, dtype)
    g = torch.Generator().manual_seed(2)
    in_proj = (torch.randn(2 * E, dim, generator=g) * dim**-0.5).to(DEV)
    out_proj = (torch.randn(dim, E, generator=g) * E**-0.5).to(DEV)
    hidden = torch.randn(batch, L, dim, generator=g).to(DEV, dtype)
    weights = vk.pack_mixer_weights(in_proj, *params.values(), out_proj, dtype)
    with torch.no_grad():
        y = vk.mamba_mixer_inference(hidden, weights, *routes, config=config)
        ref = F.linear(reference(F.linear(hidden.float(), in_proj), params, routes), out_proj)
    assert y.dtype == dtype and rel_err(y, ref) < tol


# measured in float32 (interpreter): 2e-7 and below
@pytest.mark.parametrize("save_states", [False, True])
def test_training_op_small(save_states):
    check_training(2, 1, 9, 5, 4, 3, torch.float32, 1e-5, save_states)


def test_training_op_split_and_four_routes():
    cfg = vk.ScanConfig("split", "split", 4, 1, seg=4, prefetch=16)
    check_training(4, 1, 10, 3, 2, 1, torch.float32, 1e-5, False, config=cfg)


def test_inference_op_fused_unfused_and_split():
    cfg = vk.select_config(1, 5, 2, 9, 4, False, DEV)
    check_inference(2, 1, 9, 5, 4, 3, torch.float32, 1e-5)  # delta formed in the scan
    check_inference(2, 1, 9, 5, 4, 3, torch.float32, 1e-5, config=replace(cfg, dt_proj_max_rank=0))  # by a GEMM
    split = replace(cfg, fwd="split", bwd="split", chunk=4, subs=1, seg=4)
    check_inference(2, 1, 9, 5, 3, 3, torch.float32, 1e-5, config=split)  # N 3: padded operand rows


# ---- Vim's shapes on the GPU: vim_tiny (E 384, rank 12: delta in the scan) and vim_small (E 768, rank 24: GEMM) --
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("E,rank", [(384, 12), (768, 24)])
@pytest.mark.parametrize("batch,L", [(2, 785), (48, 197)])  # a small grid (split L) and a large one
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_mixer_ops_gpu(E, rank, batch, L, dtype, tol):
    check_inference(2, batch, L, E, 16, rank, dtype, tol, dim=E // 2)
    check_training(2, batch, L, E, 16, rank, dtype, tol, save_states=False)
    check_training(2, batch, L, E, 16, rank, dtype, tol, save_states=True)
