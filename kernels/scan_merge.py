"""Triton kernels that merge the routes of a multi-route scan: mean over routes, then the silu(z) gate (and back).

Every route's forward adds its y into one float32 (batch, L, dim) buffer (ACCUM); these elementwise kernels turn
that sum into the block's gated output, and the output's gradient into the shared dy of every route and dz.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _z_offsets(offs, DIM, s_z):
    # z is (batch * L) rows of DIM channels, `s_z` apart (a half of in_proj's output: 2 * DIM)
    row = offs // DIM
    return row * s_z + (offs - row * DIM)


@triton.jit
def _merge_fwd_kernel(acc_ptr, z_ptr, out_ptr, n_elem, DIM, s_z, inv_r, HAS_Z: tl.constexpr, BLOCK: tl.constexpr):
    # out = (sum_r y_r) / R * silu(z); acc and out contiguous (batch, L, dim)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elem
    y = tl.load(acc_ptr + offs, mask=m, other=0.0) * inv_r
    if HAS_Z:
        zv = tl.load(z_ptr + _z_offsets(offs, DIM, s_z), mask=m, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _merge_bwd_kernel(
    acc_ptr, z_ptr, dout_ptr, dy_ptr, dz_ptr, n_elem, DIM, s_z, inv_r, HAS_Z: tl.constexpr, BLOCK: tl.constexpr
):
    # dy (shared by every route) = dout * silu(z) / R;  dz = dout * ybar * silu'(z), ybar = acc / R; all but z
    # contiguous
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elem
    do = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + _z_offsets(offs, DIM, s_z), mask=m, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zv)
        ybar = tl.load(acc_ptr + offs, mask=m, other=0.0) * inv_r
        tl.store(dz_ptr + offs, (do * ybar * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m)
        do = do * zv * sz
    tl.store(dy_ptr + offs, do * inv_r, mask=m)


def z_rows(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """z (batch, L, dim) as rows the merge kernels index: (z, row stride), copied only when its batch and token
    axes do not form one strided row axis or its channels are not contiguous."""
    batch, L, dim = z.shape
    if z.stride(-1) != 1 or (batch > 1 and z.stride(0) != L * z.stride(1)):
        z = z.contiguous()
    return z, z.stride(1)


def merge_routes(acc: torch.Tensor, z: torch.Tensor | None, out: torch.Tensor, routes: int) -> torch.Tensor:
    """out = acc / routes * silu(z): acc float32 and out contiguous (batch, L, dim); z any rows (z_rows); out may be
    z itself (each element of z is read before the same program writes it)."""
    n, dim, has_z = out.numel(), out.shape[-1], z is not None
    z, s_z = z_rows(z) if has_z else (acc, dim)
    _merge_fwd_kernel[(triton.cdiv(n, BLOCK),)](acc, z, out, n, dim, s_z, 1.0 / routes, HAS_Z=has_z, BLOCK=BLOCK)
    return out


def merge_routes_backward(acc, z, dout, routes: int, dy: torch.Tensor, dz: torch.Tensor | None) -> None:
    """Fills dy (float32, the gradient of every route's y) and dz (contiguous) from the merged output's gradient
    dout (contiguous)."""
    n, dim, has_z = dy.numel(), dy.shape[-1], z is not None
    z, s_z = z_rows(z) if has_z else (acc, dim)
    _merge_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        acc, z, dout, dy, dz if has_z else dy, n, dim, s_z, 1.0 / routes, HAS_Z=has_z, BLOCK=BLOCK
    )
