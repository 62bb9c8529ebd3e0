"""A Mamba block's entry in one pass: residual += hidden (float32), then RMSNorm of the new residual.

Vim (like mamba_ssm's fused add + norm) keeps the residual stream in float32 and feeds the mixer the RMSNorm of
residual + hidden. Unfused, that is four passes over the tokens (the cast of hidden, the add, the norm, the cast of
its output to the autocast dtype); the Triton kernel reads hidden and the residual once and writes the residual and
the normed output once. Forward only: training keeps the autograd path of the model. Under torch.compile the functional custom op `vim::add_rms_norm` is traced
(in-place updates are the eager path's way to save memory; the compiler plans memory itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends


def add_rms_norm_ref(hidden, residual, weight, eps: float, out_dtype=None):
    """(normed, new residual): residual' = residual + hidden in float32 (hidden.float() when residual is None),
    normed = rms_norm(residual') * weight, in out_dtype (default float32)."""
    res = hidden.float() if residual is None else residual + hidden.float()
    out = F.rms_norm(res, (res.shape[-1],), weight.float(), eps)
    return out.to(out_dtype or torch.float32), res


def add_rms_norm(hidden, residual, weight, eps: float, out_dtype=None, inplace: bool = False, backend: str = "triton"):
    """The fused add + RMSNorm (see the module docstring); no autograd graph.

    hidden: (..., dim) any float dtype; residual: float32 like hidden, or None (the residual is then hidden in
    float32: hidden itself when it is float32 already); weight: (dim,). inplace: the new residual may be written
    into `residual`, and the normed output into `hidden` when it has out_dtype (neither old value is kept).
    Returns (normed in out_dtype (default float32), new residual float32).
    backend "triton": the kernel (CUDA, or CPU under TRITON_INTERPRET=1); "torch": add_rms_norm_ref.
    """
    if residual is not None and (residual.dtype != torch.float32 or residual.shape != hidden.shape):
        raise ValueError(
            f"add_rms_norm: residual must be float32 of hidden's shape {tuple(hidden.shape)}; "
            f"got {residual.dtype} {tuple(residual.shape)}"
        )
    if backend in ("torch", "ref"):
        out, res = add_rms_norm_ref(hidden, residual, weight, eps, out_dtype)
        if not inplace or torch.compiler.is_compiling():  # the compiler plans memory itself
            return out, res
        if residual is not None:
            residual.copy_(res)
            res = residual
        if hidden.dtype == out.dtype and hidden.data_ptr() != res.data_ptr():
            out = hidden.copy_(out)
        return out, res
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'torch' or 'ref'; got {backend!r}")
    backends.require_triton(hidden)
    if torch.compiler.is_compiling():
        return torch.ops.vim.add_rms_norm(hidden, residual, weight, eps, out_dtype or torch.float32)
    return backends.triton_norm.add_rms_norm(hidden, residual, weight, eps, out_dtype or torch.float32, inplace)
