"""The `vim::` custom ops: schemas, fake kernels and autograd registrations (torch.library.opcheck), on tiny inputs
(the Triton ones interpreted on CPU). torch.compile traces the model through these registrations."""

from __future__ import annotations

import os

import pytest
import torch
import vim_kernels as vk
from vim_kernels import select_config

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON_HERE = vk.HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="Triton needs CUDA or TRITON_INTERPRET=1")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def scan_args(R=2, batch=1, L=5, dim=3, N=2, seed=0):
    g = _g(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEV)  # noqa: E731
    return dict(
        u=r(R, batch, L, dim), delta=r(R, batch, L, dim, scale=0.5), A=-torch.exp(torch.rand(R, dim, N, generator=g)).to(DEV),
        B=r(R, batch, L, N), C=r(R, batch, L, N), D=r(R, dim), z=r(batch, L, dim), delta_bias=r(R, dim, scale=0.1),
    )  # fmt: skip


def mixer_args(R=2, batch=1, L=5, E=4, N=2, rank=1, K=4, seed=0):
    g = _g(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEV)  # noqa: E731
    index = torch.stack([torch.arange(L), torch.arange(L).flip(0)])[:R].to(DEV)
    inverse = torch.argsort(index, dim=1)
    return dict(
        conv_w=r(R, E, K, scale=0.5), conv_b=r(R, E, scale=0.1), x_proj_w=r(R, rank + 2 * N, E, scale=0.5),
        dt_proj_w=r(R, E, rank), dt_bias=r(R, E, scale=0.1) - 1, A_log=torch.rand(R, E, N, generator=g).to(DEV),
        D=r(R, E), routes=index, index32=index.int(), inverse32=inverse.int(),
    )  # fmt: skip


def grads(args: dict, names) -> dict:
    return {k: (v.requires_grad_() if k in names else v) for k, v in args.items()}


SCAN_DIFF = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@needs_triton
def test_selective_scan_ops():
    a = scan_args(R=1)
    args = [a["u"][0].transpose(1, 2), a["delta"][0].transpose(1, 2), a["A"][0], a["B"][0].transpose(1, 2),
            a["C"][0].transpose(1, 2), a["D"][0], a["z"].transpose(1, 2), a["delta_bias"][0]]  # fmt: skip
    args = [t.detach().clone().requires_grad_() for t in args]
    cfg = select_config(1, 3, 1, 5, 2, True, DEV).encode()
    torch.library.opcheck(torch.ops.vim.selective_scan_fwd, (*args, True, True, True, cfg))


@needs_triton
def test_multi_route_scan_ops():
    a = grads(scan_args(), SCAN_DIFF)
    cfg = select_config(1, 3, 2, 5, 2, True, DEV).encode()
    routes = torch.stack([torch.arange(5), torch.arange(5).flip(0)]).to(DEV)
    torch.library.opcheck(torch.ops.vim.multi_route_scan_fwd, (*a.values(), routes, True, True, cfg))


@needs_triton
@pytest.mark.parametrize("save_states", [False, True])
def test_mamba_inner_ops(save_states):
    a = grads(mixer_args(), ("conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_bias", "A_log", "D"))
    xz = torch.randn(1, 5, 8, generator=_g(1)).to(DEV).requires_grad_()
    cfg = select_config(1, 4, 2, 5, 2, True, DEV).encode()
    torch.library.opcheck(torch.ops.vim.mamba_inner_fwd, (xz[..., :4], xz[..., 4:], *a.values(), save_states, cfg))


@needs_triton
def test_mixer_inference_op():
    a = mixer_args()
    g = _g(2)
    in_proj, out_proj = torch.randn(8, 3, generator=g).to(DEV), torch.randn(3, 4, generator=g).to(DEV)
    params = [a[k] for k in ("conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_bias", "A_log", "D")]
    weights = vk.pack_mixer_weights(in_proj, *params, out_proj, torch.float32)
    hidden = torch.randn(1, 5, 3, generator=g).to(DEV)
    cfg = select_config(1, 4, 2, 5, 2, False, DEV).encode()
    routes = (a["routes"], a["index32"], a["inverse32"])
    torch.library.opcheck(torch.ops.vim.mamba_mixer_inference, (hidden, *weights, *routes, cfg))


@needs_triton
def test_route_conv_and_norm_ops():
    a = mixer_args()
    x = torch.randn(1, 5, 4, generator=_g(3)).to(DEV).requires_grad_()
    w, b = a["conv_w"].requires_grad_(), a["conv_b"].requires_grad_()
    torch.library.opcheck(torch.ops.vim.route_conv_silu, (x, w, b, a["index32"], a["inverse32"]))
    hidden, residual, weight = torch.randn(2, 6, 8).to(DEV), torch.randn(2, 6, 8).to(DEV), torch.rand(8).to(DEV)
    torch.library.opcheck(torch.ops.vim.add_rms_norm, (hidden, residual, weight, 1e-5, torch.float32))
    torch.library.opcheck(torch.ops.vim.add_rms_norm, (hidden, None, weight, 1e-5, torch.float32))


def test_torch_backend_scan_op():
    g = _g(4)
    L, R, b, dim, N = 4, 2, 1, 3, 2
    args = [torch.randn(L, R, b, dim, generator=g), torch.randn(L, R, b, dim, generator=g),
            -torch.rand(R, N, dim, generator=g), torch.randn(L, R, b, N, generator=g),
            torch.randn(L, R, b, N, generator=g), torch.randn(R, dim, generator=g), torch.randn(R, dim, generator=g)]  # fmt: skip
    torch.library.opcheck(torch.ops.vim.scan_tm_fwd, (*[t.requires_grad_() for t in args], True))
