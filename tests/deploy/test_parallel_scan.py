"""The `parallel` scan backend (chunked associative scan for export) against the sequential reference scan."""

from __future__ import annotations

import pytest
import torch
import vim_kernels as vk
from vim_kernels.parallel_scan import CHUNK, linear_recurrence

from vision_mamba.models.factory import create_model


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def route_inputs(R: int, batch: int, L: int, dim: int, N: int, seed: int, large_decay: bool = False) -> dict:
    """Multi-route scan inputs; `large_decay`: delta ~20 after softplus and A down to -16, so exp(delta A) underflows
    to 0 (a decay of e^-320) on most steps."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        u=r(R, batch, L, dim),
        delta=r(R, batch, L, dim) + (19.0 if large_decay else 0.0),
        A=-torch.exp(torch.rand(R, dim, N, generator=g) * (2.77 if large_decay else 1.0)),
        B=r(R, batch, L, N),
        C=r(R, batch, L, N),
        D=r(R, dim),
        z=r(batch, L, dim),
        delta_bias=torch.rand(R, dim, generator=g) - 0.5,
        routes=torch.stack([torch.randperm(L, generator=g) for _ in range(R)]),
    )


# 1 and 2 steps, odd lengths inside one chunk and across several, a chunk exactly, Vim-Ti's 197 tokens
@pytest.mark.parametrize("L", [1, 2, 7, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 197])
def test_multi_route_matches_the_reference(L: int) -> None:
    inputs = route_inputs(2, 2, L, 6, 4, seed=L)
    ref = vk.multi_route_selective_scan_ref(**inputs)
    out = vk.multi_route_selective_scan(**inputs, backend="parallel")
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("L", [5, 2 * CHUNK + 3])
def test_large_decays_underflow_to_zero_without_nan(L: int) -> None:
    inputs = route_inputs(4, 1, L, 8, 16, seed=7, large_decay=True)
    ref = vk.multi_route_selective_scan_ref(**inputs)
    assert rel_err(vk.multi_route_selective_scan(**inputs, backend="parallel"), ref) < 1e-6


def test_single_route_and_last_state_match_the_reference() -> None:
    x = route_inputs(1, 3, 2 * CHUNK + 9, 5, 4, seed=3)
    mamba = lambda t: t[0].transpose(1, 2)  # noqa: E731 - (batch, dim, L) / (batch, N, L) layout
    args = (mamba(x["u"]), mamba(x["delta"]), x["A"][0], mamba(x["B"]), mamba(x["C"]), x["D"][0],
            x["z"].transpose(1, 2), x["delta_bias"][0])
    ref, ref_last = vk.selective_scan_ref(*args, delta_softplus=True, return_last_state=True)
    out, last = vk.selective_scan(*args, delta_softplus=True, return_last_state=True, backend="parallel")
    assert rel_err(out, ref) < 1e-6 and rel_err(last, ref_last) < 1e-6


def test_recurrence_matches_a_hand_loop_exactly() -> None:
    """h_t = a_t h_{t-1} + b_t with decays 1/2 and integer inputs: every state is exact in float32."""
    length = 3 * CHUNK + 2
    a = torch.full((1, 1, length, 1), 0.5)
    b = torch.arange(length, dtype=torch.float32).reshape(1, 1, length, 1) % 5
    expected, h = [], 0.0
    for t in range(length):
        h = 0.5 * h + float(b[0, 0, t, 0])
        expected.append(h)
    assert torch.equal(linear_recurrence(a, b)[0, 0, :, 0], torch.tensor(expected))


def test_gradients_match_the_reference() -> None:
    inputs = route_inputs(2, 1, CHUNK + 3, 4, 4, seed=11)
    grads = []
    for backend in ("ref", "parallel"):
        xs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        out = vk.multi_route_selective_scan(**xs, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({k: v.grad for k, v in xs.items() if v.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert rel_err(grads[1][key], grads[0][key]) < 1e-5, key


@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_model_on_the_parallel_backend_matches_the_torch_backend(scan: str) -> None:
    torch.manual_seed(0)
    model = create_model("vim_digits", patch_size=8, scan=scan, scan_backend="torch").eval()
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        expected = model(images)
        model.set_scan_backend("parallel")
        got = model(images)
    assert rel_err(got, expected) < 1e-5
