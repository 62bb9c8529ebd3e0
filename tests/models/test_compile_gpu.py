"""torch.compile(fullgraph=True) of vim_tiny and vim_small on a GPU (inductor, bf16 autocast): no graph break, and the
compiled outputs and every gradient equal eager within bf16 tolerance, for both scan patterns."""

from __future__ import annotations

import pytest
import timm
import torch

import vision_mamba.models  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def step(model, x):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    return out.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


# the block is the same at every depth: 6 blocks keep inductor's compile time down
@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_small_patch16_224"])
@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_compiled_model_equals_eager(name, scan):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=6, scan=scan).cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # any graph break raises
    out, grads = step(compiled, x)
    ref, ref_grads = step(model, x)
    assert rel_err(out, ref) < 2e-2
    for n, g in ref_grads.items():
        assert rel_err(grads[n], g) < 2e-2, n
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel_err(compiled(x).float(), model(x).float()) < 2e-2


def test_cuda_graph_inference_through_compile():
    # mode="reduce-overhead": the inference forward replayed as CUDA graphs, fed new inputs
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=4).cuda().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            x = torch.randn(4, 3, 224, 224, device="cuda")
            out = compiled(x).float().clone()
            assert rel_err(out, model(x).float()) < 2e-2
