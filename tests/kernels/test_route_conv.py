"""Route conv (depthwise causal conv1d + SiLU along each scan route): Triton gather kernels against the reference."""

from __future__ import annotations

import os

import pytest
import torch
from vim_kernels import route_conv1d_silu, route_conv1d_silu_ref

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _routes(R, L, kind, g):
    ar = torch.arange(L)
    if kind == "bidirectional":
        return torch.stack([ar, ar.flip(0)])
    return torch.stack([ar] + [torch.randperm(L, generator=g) for _ in range(R - 1)])


def _check(R, L, E, batch, kind, dtype, device, tol):
    g = torch.Generator().manual_seed(L * 7 + R)
    # x is half of a wider tensor, as in the mixer (in_proj's output split into x and z): a non-unit row stride
    x = torch.randn(batch, L, 2 * E, generator=g)[..., :E].to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(R, E, 4, generator=g).to(device).requires_grad_()
    b = torch.randn(R, E, generator=g).to(device).requires_grad_()
    index = _routes(R, L, kind, g).to(device)
    inverse = torch.argsort(index, dim=1)
    out = route_conv1d_silu(x, w, b, index, inverse, backend="triton")
    xr = x.detach().float().requires_grad_()
    ref = route_conv1d_silu_ref(xr, w, b, index)
    assert out.shape == (R, batch, L, E) and out.dtype == dtype
    assert torch.isfinite(out).all()
    rel = lambda a, r: ((a.double() - r.double()).norm() / r.double().norm().clamp_min(1e-6)).item()  # noqa: E731
    assert rel(out.float(), ref) < tol
    grad = torch.randn_like(ref)
    gs = torch.autograd.grad(out.float(), [x, w, b], grad)
    rs = torch.autograd.grad(ref, [xr, w, b], grad)
    for name, a, r in zip(("x", "weight", "bias"), gs, rs):
        assert rel(a.float(), r) < tol, name


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("R,L,kind", [(2, 1, "bidirectional"), (2, 9, "bidirectional"), (4, 13, "random")])
def test_route_conv_matches_reference_small(R, L, kind):
    _check(R, L, 20, 2, kind, torch.float32, "cuda" if CUDA else "cpu", 1e-5)


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_route_conv_channels_a_multiple_of_the_block():
    # E a multiple of the channel block: the kernels' unclamped, unmasked channel path (EVEN_E)
    from vim_kernels import triton_route_conv

    _check(2, 9, 2 * triton_route_conv.BE, 1, "bidirectional", torch.float32, "cuda" if CUDA else "cpu", 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("R,L,kind", [(2, 197, "bidirectional"), (4, 197, "random"), (4, 1025, "random")])
def test_route_conv_gpu(R, L, kind, dtype, tol):
    _check(R, L, 768, 4, kind, dtype, "cuda", tol)
    _check(R, L, 200, 2, kind, dtype, "cuda", tol)  # not a multiple of the channel block


def test_route_conv_rejects_unknown_backend():
    x = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="backend must be"):
        route_conv1d_silu(x, torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.arange(3)[None], backend="cuda")
