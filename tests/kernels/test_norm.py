"""The fused residual add + RMSNorm (vim_kernels.add_rms_norm): Triton kernel against the reference."""

from __future__ import annotations

import os

import pytest
import torch
from vim_kernels import add_rms_norm, add_rms_norm_ref

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture
def triton_norm():
    if not (CUDA or INTERPRET):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


def _inputs(rows, dim, h_dtype, with_residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(1, rows, dim, generator=g) * 3).to(device=DEV, dtype=h_dtype)
    residual = torch.randn(1, rows, dim, generator=g).to(DEV) if with_residual else None
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(DEV)
    return hidden, residual, weight


# dim 24: not a power of two (masked columns); 5 rows: a partial block of rows
@pytest.mark.parametrize("dim,rows", [(24, 5), (32, 4)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("h_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_add_rms_norm_triton(triton_norm, dim, rows, with_residual, h_dtype, out_dtype):
    hidden, residual, weight = _inputs(rows, dim, h_dtype, with_residual)
    ref_out, ref_res = add_rms_norm_ref(hidden, residual, weight, 1e-5, out_dtype)
    out, res = add_rms_norm(hidden, residual, weight, 1e-5, out_dtype, backend="triton")
    assert out.dtype == out_dtype and out.shape == hidden.shape and res.dtype == torch.float32
    torch.testing.assert_close(res, ref_res, rtol=1e-6, atol=1e-6)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
    if residual is not None:
        assert res.data_ptr() != residual.data_ptr()  # not in place unless asked


def test_add_rms_norm_inplace(triton_norm):
    hidden, residual, weight = _inputs(6, 16, torch.bfloat16, True, seed=3)
    ref_out, ref_res = add_rms_norm_ref(hidden, residual.clone(), weight, 1e-5, torch.bfloat16)
    h32 = hidden.float()
    out, res = add_rms_norm(hidden, residual, weight, 1e-5, torch.bfloat16, inplace=True, backend="triton")
    # the new residual over the old one, the normed output over hidden (same dtype)
    assert res.data_ptr() == residual.data_ptr() and out.data_ptr() == hidden.data_ptr()
    torch.testing.assert_close(residual, ref_res, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-2, atol=1e-2)
    # block 0: a float32 hidden is the residual itself (no copy, nothing stored), so the output needs its own buffer
    ref0 = add_rms_norm_ref(h32, None, weight, 1e-5)[0]
    keep = h32.clone()
    out0, res0 = add_rms_norm(h32, None, weight, 1e-5, torch.float32, inplace=True, backend="triton")
    assert res0.data_ptr() == h32.data_ptr() and out0.data_ptr() != h32.data_ptr()
    torch.testing.assert_close(h32, keep)
    torch.testing.assert_close(out0, ref0, rtol=1e-5, atol=1e-5)


def test_add_rms_norm_torch_backend_inplace():
    hidden, residual, weight = _inputs(3, 8, torch.float32, True, seed=5)
    expect = residual + hidden
    _, res = add_rms_norm(hidden, residual, weight, 1e-5, inplace=True, backend="torch")
    assert res.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(residual, expect)


def test_add_rms_norm_rejects_a_low_precision_residual():
    hidden, residual, weight = _inputs(3, 8, torch.float32, True)
    with pytest.raises(ValueError, match="residual must be float32"):
        add_rms_norm(hidden, residual.half(), weight, 1e-5, backend="torch")
