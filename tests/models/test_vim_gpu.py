"""The model on CUDA: the auto/triton backend matches the torch backend, and bf16 autocast trains."""

from __future__ import annotations

import pytest
import timm
import torch
from model_reference import rel_err

import vision_mamba.models  # noqa: F401
from vision_mamba.models import scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def full_float32(monkeypatch):
    """float32 references in float32: no TF32 in cuBLAS/cuDNN (the torch backend's convs and matmuls)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _run(model, x, autocast: bool = False):
    """Logits and every parameter's gradient of a SUM over the logits (so each gradient is a full-size signal, not
    one shrunk by the element count: an all-zero gradient then shows as an error of 1)."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().sum().backward()
    return out.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scan_name", ["bidirectional", "cross"])
def test_triton_backend_matches_torch_backend(scan_name):
    # float32 on both sides: benchmarks/results/gpu_training_check_h100.json measured the logits of Vim-S at a
    # relative error of 2.5e-6 (Triton vs the reference scan); 1e-3 per tensor still fails a zeroed, halved or
    # mis-routed tensor by orders of magnitude
    if not scan.triton_available():
        pytest.skip("the Triton backend is not available")
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=4, scan=scan_name, scan_backend="torch").cuda().eval()
    x = torch.randn(2, 3, 224, 160, device="cuda")
    out_t, grads_t = _run(model, x)
    model.set_scan_backend("triton")
    out_k, grads_k = _run(model, x)
    assert rel_err(out_k, out_t) < 1e-3
    errors = {n: rel_err(grads_k[n], grads_t[n]) for n in grads_t}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, f"{worst}: {errors[worst]:.2e}"


def test_bf16_autocast_step_on_cuda():
    # bf16 autocast against the float32 forward/backward of the same weights. The CPU analogue (torch backend, this
    # model, input and loss) measured logits at 5e-3 and gradients at up to 1.7e-2 (median 7e-3)
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=4, scan="cross").cuda().train()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    out32, grads32 = _run(model, x)
    out16, grads16 = _run(model, x, autocast=True)
    assert rel_err(out16, out32) < 2e-2
    errors = {n: rel_err(grads16[n], grads32[n]) for n in grads32}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 6e-2, f"{worst}: {errors[worst]:.2e}"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_long_sequence_inference_matches_torch_backend():
    # 16 images at 768 (2305 tokens, two routes): the long-sequence forward settings (32 channels per program,
    # loads four steps ahead, L2 prefetch), under bf16 autocast as the inference benchmark runs it
    if not scan.triton_available():
        pytest.skip("the Triton backend is not available")
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=2, img_size=768, scan_backend="torch").cuda().eval()
    x = torch.randn(16, 3, 768, 768, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x).float()
        model.set_scan_backend("triton")
        out = model(x).float()
    assert rel_err(out, ref) < 2e-2  # two bf16 computations, each ~5e-3 from float32 (the CPU analogue's figure)


def test_cuda_graph_inference_replays_the_model():
    # one captured graph per input shape: its replays give the eager outputs for new inputs, a wrong shape is refused
    from vision_mamba.models import CudaGraphInference

    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=2).cuda()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    graphed = CudaGraphInference(model, x)
    for _ in range(2):
        x = torch.randn(1, 3, 224, 224, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref = model(x).float()
        out = graphed(x)
        # the same kernels replayed on the same input: equal up to a different launch configuration's rounding
        assert rel_err(out.float(), ref) < 1e-3
    with pytest.raises(ValueError, match="captured for inputs"):
        graphed(torch.randn(2, 3, 224, 224, device="cuda"))
