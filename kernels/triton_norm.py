"""Triton kernel of vim_kernels.add_rms_norm (the residual add and the RMSNorm of a Mamba block in one pass) and its
custom op `vim::add_rms_norm`."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _add_rms_norm_kernel(
    h_ptr, res_ptr, w_ptr, res_out_ptr, out_ptr, n_rows, DIM, eps,
    HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # ROWS rows of DIM per program, in float32: r = res + h (or h), out = r * rsqrt(mean(r^2) + eps) * w
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < DIM)[None, :]
    offs = rows.to(tl.int64)[:, None] * DIM + cols[None, :]
    r = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r += tl.load(res_ptr + offs, mask=mask, other=0.0)
    if STORE_RES:
        tl.store(res_out_ptr + offs, r, mask=mask)
    inv = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / DIM + eps)
    w = tl.load(w_ptr + cols, mask=cols < DIM, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (r * inv[:, None] * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(hidden, residual, weight, eps, out_dtype, inplace):
    """See vim_kernels.add_rms_norm (forward only: no autograd graph)."""
    dim = hidden.shape[-1]
    h = hidden.contiguous()
    n_rows = h.numel() // dim
    if residual is None:
        # the new residual is hidden itself when it is float32 already (nothing to store), else its float32 copy
        res_out = h if h.dtype == torch.float32 else torch.empty(h.shape, device=h.device, dtype=torch.float32)
    else:
        residual = residual.contiguous()
        res_out = residual if inplace else torch.empty_like(residual)
    # in place, the normed output goes over hidden when their dtypes agree (a kernel program reads its rows of
    # hidden before it writes them): the caller's hidden is dead after this call, and its memory is reused
    reuse = inplace and h.dtype == out_dtype and res_out is not h
    out = h if reuse else torch.empty(h.shape, device=h.device, dtype=out_dtype)
    block = triton.next_power_of_2(dim)
    rows = 2 if _INTERPRET else max(1, min(16, 4096 // block))
    _add_rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        h, residual if residual is not None else h, weight, res_out, out, n_rows, dim, eps,
        HAS_RES=residual is not None, STORE_RES=res_out is not h, ROWS=rows, BLOCK=block,
        num_warps=1 if _INTERPRET else 4,
    )  # fmt: skip
    return out.view(hidden.shape), res_out.view(hidden.shape)


@torch.library.custom_op("vim::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The functional form of add_rms_norm (what torch.compile traces): (normed in out_dtype, new float32 residual),
    both new tensors."""
    if residual is None and hidden.dtype == torch.float32:
        hidden = hidden.clone()  # the new residual would be hidden itself: an op's outputs may not alias its inputs
    out, res = add_rms_norm(hidden, residual, weight, eps, out_dtype, False)
    return out, res


@add_rms_norm_op.register_fake
def _(hidden, residual, weight, eps, out_dtype):
    return hidden.new_empty(hidden.shape, dtype=out_dtype), hidden.new_empty(hidden.shape, dtype=torch.float32)
