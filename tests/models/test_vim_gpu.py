"""The model on CUDA: the auto/triton backend matches the torch backend, and bf16 autocast trains."""

from __future__ import annotations

import pytest
import timm
import torch

import vision_mamba.models  # noqa: F401
from vision_mamba.models import scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _run(model, x):
    model.zero_grad()
    out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scan_name", ["bidirectional", "cross"])
def test_triton_backend_matches_torch_backend(scan_name):
    if not scan.triton_available():
        pytest.skip("the Triton backend is not available")
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=4, scan=scan_name, scan_backend="torch").cuda().eval()
    x = torch.randn(2, 3, 224, 160, device="cuda")
    out_t, grads_t = _run(model, x)
    model.set_scan_backend("triton")
    out_k, grads_k = _run(model, x)
    torch.testing.assert_close(out_k, out_t, rtol=1e-3, atol=1e-3)
    for n in grads_t:
        torch.testing.assert_close(grads_k[n], grads_t[n], rtol=1e-2, atol=1e-3, msg=n)


def test_bf16_autocast_step_on_cuda():
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=4, scan="cross").cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


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
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


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
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="captured for inputs"):
        graphed(torch.randn(2, 3, 224, 224, device="cuda"))
