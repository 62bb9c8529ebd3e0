"""The `torch` backend (time-major scan with a hand-written backward): outputs and all gradients against `ref`."""

from __future__ import annotations

import pytest
import torch
import vim_kernels as vk

TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 2e-2)}


def rel_err(x, ref):
    assert torch.isfinite(x).all()
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _nonzero(t):
    return torch.where(t.abs() < 1e-3, torch.full_like(t, 1e-3), t)


def scan_inputs(batch, dim, L, N, seed, dtype=torch.float32, big=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: _nonzero(torch.randn(*s, generator=g))  # noqa: E731
    A = -torch.exp(torch.rand(dim, N, generator=g) * (2.77 if big else 1.0))  # up to -16 when big
    delta = r(batch, L, dim).transpose(1, 2) + (19.0 if big else 0.0)  # softplus(~20): delta up to ~20
    return dict(
        u=r(batch, L, dim).transpose(1, 2).to(dtype),
        delta=delta.to(dtype),
        A=A,
        B=r(batch, L, N).transpose(1, 2).to(dtype),
        C=r(batch, L, N).transpose(1, 2).to(dtype),
        D=r(dim),
        z=r(batch, L, dim).transpose(1, 2).to(dtype),
        delta_bias=torch.rand(dim, generator=g) - 0.5,
    )


def _run(fn, inputs, grad_out, grad_last, **kw):
    xs = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    res = fn(**xs, **kw)
    out, last = res if isinstance(res, tuple) else (res, None)
    loss = (out.float() * grad_out).sum()
    if last is not None:
        loss = loss + (last * grad_last).sum()
    loss.backward()
    return out.detach(), last, {k: v.grad for k, v in xs.items() if v is not None}


def compare(inputs, tol_out, tol_grad, **kw):
    u = inputs["u"]
    g = torch.Generator().manual_seed(99)
    grad_out = torch.randn(u.shape, generator=g)
    grad_last = torch.randn(u.shape[0], u.shape[1], inputs["A"].shape[1], generator=g)
    out, last, grads = _run(vk.selective_scan_torch, inputs, grad_out, grad_last, **kw)
    ref_in = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    ref_out, ref_last, ref_grads = _run(vk.selective_scan_ref, ref_in, grad_out, grad_last, **kw)
    assert out.dtype == u.dtype and out.shape == u.shape
    assert rel_err(out, ref_out) < tol_out
    if kw.get("return_last_state"):
        assert last.shape == ref_last.shape and rel_err(last, ref_last) < tol_out
    assert set(grads) == set(ref_grads)
    for k, gr in ref_grads.items():
        assert grads[k].shape == inputs[k].shape, k
        assert rel_err(grads[k], gr) < tol_grad, k


@pytest.mark.parametrize("L", [1, 2, 17, 65])
@pytest.mark.parametrize(
    "opts",
    [
        (True, True, True, True, True),
        (False, False, False, False, False),
        (True, False, True, False, True),
        (False, True, False, True, False),
    ],
)
def test_scan_options(L, opts):
    use_z, use_D, use_bias, softplus, last = opts
    inputs = scan_inputs(2, 6, L, 4, seed=L)
    if not use_z:
        inputs["z"] = None
    if not use_D:
        inputs["D"] = None
    if not use_bias:
        inputs["delta_bias"] = None
    if not softplus:
        inputs["delta"] = inputs["delta"].abs() + 0.05  # delta positive without softplus
    compare(inputs, *TOL[torch.float32], delta_softplus=softplus, return_last_state=last)


def test_bf16():
    compare(scan_inputs(2, 6, 17, 4, seed=5, dtype=torch.bfloat16), *TOL[torch.bfloat16], delta_softplus=True)


def test_large_delta_finite_exact():
    compare(
        scan_inputs(2, 5, 33, 4, seed=7, big=True), *TOL[torch.float32], delta_softplus=True, return_last_state=True
    )


def test_many_blocks(monkeypatch):
    """Batch split into several scratch blocks (and buffers reused across calls) gives the same result."""
    import vim_kernels.torch_scan as ts

    monkeypatch.setattr(ts, "BLOCK_BYTES", 1)
    compare(scan_inputs(3, 6, 9, 4, seed=3), *TOL[torch.float32], delta_softplus=True, return_last_state=True)


def route_inputs(R, batch, L, dim, N, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: _nonzero(torch.randn(*s, generator=g))  # noqa: E731
    return dict(
        u=r(R, batch, L, dim).to(dtype),
        delta=r(R, batch, L, dim).to(dtype),
        A=-torch.exp(torch.rand(R, dim, N, generator=g)),
        B=r(R, batch, L, N).to(dtype),
        C=r(R, batch, L, N).to(dtype),
        D=r(R, dim),
        z=r(batch, L, dim).to(dtype),
        delta_bias=torch.rand(R, dim, generator=g) - 0.5,
    )


@pytest.mark.parametrize(
    "R,L,dtype", [(2, 17, torch.float32), (4, 13, torch.float32), (2, 65, torch.float32), (4, 9, torch.bfloat16)]
)
def test_multi_route(R, L, dtype):
    inputs = route_inputs(R, 3, L, 8, 4, seed=R + L, dtype=dtype)
    ar = torch.arange(L)
    g = torch.Generator().manual_seed(1)
    routes = (
        torch.stack([ar, ar.flip(0)]) if R == 2 else torch.stack([torch.randperm(L, generator=g) for _ in range(R)])
    )
    grad_out = torch.randn(inputs["z"].shape, generator=g)
    outs = []
    for fn, inp in (
        (vk.multi_route_selective_scan_torch, inputs),
        (vk.multi_route_selective_scan_ref, {k: v.float() for k, v in inputs.items()}),
    ):
        xs = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
        out = fn(**xs, routes=routes)
        (out.float() * grad_out).sum().backward()
        outs.append((out.detach(), {k: v.grad for k, v in xs.items()}))
    (out, grads), (ref_out, ref_grads) = outs
    tol_out, tol_grad = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) < tol_out
    for k, gr in ref_grads.items():
        assert grads[k].shape == inputs[k].shape, k
        assert rel_err(grads[k], gr) < tol_grad, k
