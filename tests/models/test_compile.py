"""torch.compile(fullgraph=True) traces Vim with no graph break, forward and backward, with and without gradients:
on the torch backend (CPU) and through the Triton custom ops (interpreted on CPU, real kernels on a GPU)."""

from __future__ import annotations

import os

import pytest
import timm
import torch

import vision_mamba.models  # noqa: F401  (registers the variants)
import vim_kernels
from vision_mamba.models.vim import VisionMamba

CUDA = torch.cuda.is_available()
TRITON_HERE = vim_kernels.HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def compiled_equals_eager(model, x, tol: float) -> None:
    """Compiled with fullgraph=True (any graph break raises), AOTAutograd tracing forward and backward: outputs with
    and without gradients, and every parameter's gradient of a sum loss, against eager."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.sum().backward()
    assert rel_err(out, ref) < tol
    for name, p in model.named_parameters():
        assert rel_err(got[name], p.grad) < tol, name
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < tol


@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_embedded_default_compiles_without_graph_breaks(scan):
    # the embedded default (vim_digits) on the torch backend, as CPU training runs it
    torch.manual_seed(0)
    model = timm.create_model("vim_digits", scan=scan, scan_backend="torch")
    compiled_equals_eager(model, torch.randn(2, 3, 32, 32), tol=1e-6)  # measured: identical


@pytest.mark.skipif(not TRITON_HERE, reason="needs CUDA or the interpreter")
def test_triton_custom_ops_compile_without_graph_breaks():
    # the fused training op and the inference op traced through their fake kernels and autograd registrations; the
    # compiled graph hands the ops tensors with other strides than eager (the kernels must not assume them)
    dev = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=8, embed_dim=8, depth=1, num_classes=5, scan_backend="triton")
    compiled_equals_eager(model.to(dev), torch.randn(1, 3, 16, 16, device=dev), tol=1e-6)
