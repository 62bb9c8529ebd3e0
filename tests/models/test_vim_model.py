"""VisionMamba: variants, state-dict layout, timm contract (features, intermediates, weight decay, layer decay)."""

from __future__ import annotations

import os

import pytest
import timm
import torch
import torch.nn.functional as F
from model_reference import rel_err, timm_resize
from timm.optim import param_groups_layer_decay

import vision_mamba.models  # noqa: F401  (registers the variants)
from vision_mamba.models.vim import PatchEmbed, VisionMamba

VARIANTS = {  # name: (embed_dim, patch stride, grid side at 224)
    "vim_tiny_patch16_224": (192, 16, 14),
    "vim_small_patch16_224": (384, 16, 14),
    "vim_base_patch16_224": (768, 16, 14),
    "vim_tiny_patch16_stride8_224": (192, 8, 27),
    "vim_small_patch16_stride8_224": (384, 8, 27),
}

PER_ROUTE = ("conv1d", "x_proj", "dt_proj")


def tiny(**kwargs) -> VisionMamba:
    """A small model for behaviour tests: 32x32 input, 8px patches (4x4 grid), embed 32, depth 2."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=7, scan_backend="torch")
    return VisionMamba(**{**args, **kwargs})


def expected_shapes(d: int, depth: int, grid: int, num_classes: int = 1000, patch: int = 16) -> dict:
    e, n, r = 2 * d, 16, -(-d // 16)
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, grid * grid + 1, d),
        "patch_embed.proj.weight": (d, 3, patch, patch),
        "patch_embed.proj.bias": (d,),
        "head.weight": (num_classes, d),
        "head.bias": (num_classes,),
        "norm_f.weight": (d,),
    }
    for i in range(depth):
        p = f"layers.{i}."
        shapes |= {p + "norm.weight": (d,), p + "mixer.in_proj.weight": (2 * e, d), p + "mixer.out_proj.weight": (d, e)}
        for s, a in (("", "A_log"), ("_b", "A_b_log")):
            shapes |= {
                p + f"mixer.{a}": (e, n),
                p + f"mixer.D{s}": (e,),
                p + f"mixer.conv1d{s}.weight": (e, 1, 4),
                p + f"mixer.conv1d{s}.bias": (e,),
                p + f"mixer.x_proj{s}.weight": (r + 2 * n, e),
                p + f"mixer.dt_proj{s}.weight": (e, r),
                p + f"mixer.dt_proj{s}.bias": (e,),
            }
    return shapes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_build_with_the_official_state_dict(name):
    d, stride, grid = VARIANTS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert (model.embed_dim, model.num_features, model.patch_stride, model.depth, model.num_classes) == (
        d,
        d,
        stride,
        24,
        1000,
    )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(d, 24, grid)


def test_vim_tiny_has_the_official_parameter_count():
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_patch16_224", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 7_148_008


def test_vim_digits_builds_and_runs():
    model = timm.create_model("vim_digits", scan_backend="torch")
    assert model.num_classes == 10 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cross_variant_adds_two_routes_and_keeps_the_official_names():
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_patch16_224", scan="cross")
    keys = set(model.state_dict())
    assert set(expected_shapes(192, 24, 14)) <= keys
    for s in ("_c", "_cb"):
        assert f"layers.3.mixer.conv1d{s}.weight" in keys and f"layers.3.mixer.A{s}_log" in keys


def test_pretrained_true_points_to_a_local_path():
    with pytest.raises(ValueError, match="pretrained_path=.*model.pretrained="):
        timm.create_model("vim_tiny_patch16_224", pretrained=True)


def test_image_size_must_tile():
    with pytest.raises(ValueError, match="30x30.*patches"):
        tiny(img_size=30)
    model = tiny()
    with pytest.raises(ValueError, match="36x32"):
        model(torch.randn(1, 3, 36, 32))


@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_gradients_reach_every_parameter(scan):
    torch.manual_seed(0)
    model = tiny(scan=scan, drop_path_rate=0.1, drop_rate=0.1).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_vim_tiny_same_weights_at_224_and_448():
    # the 224 model run at 448 computes what a model built at 448 computes with the same weights and the pos_embed
    # resized by timm (14x14 -> 28x28, class row in the middle); six blocks: more only repeat the same arithmetic
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=6, scan_backend="torch").eval()
    big = timm.create_model("vim_tiny_patch16_224", depth=6, scan_backend="torch", img_size=448).eval()
    state = dict(model.state_dict())
    state["pos_embed"] = timm_resize(model.pos_embed.detach(), (14, 14), (28, 28))
    big.load_state_dict(state)
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        out, want = model(x), big(x)
    assert out.shape == (1, 1000)
    assert rel_err(out, want) < 1e-5  # measured 0: the same arithmetic


def test_forward_features_and_head():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 40)  # 4x5 grid, class token at index 10
    feats = model.forward_features(x)
    assert feats.shape == (2, 21, 32) and feats.dtype == torch.float32
    pre = model.forward_head(feats, pre_logits=True)
    assert torch.equal(pre, feats[:, 10])
    # the head is a linear map of the middle (class) token, written out here by hand
    assert rel_err(model(x), F.linear(feats[:, 20 // 2], model.head.weight, model.head.bias)) < 1e-6


def test_forward_intermediates_shapes_and_consistency():
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 48)  # 4x6 grid
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 3 and all(t.shape == (2, 32, 4, 6) for t in inter)
    torch.testing.assert_close(final, model.forward_features(x))
    # the last block output, normed, is forward_features' patch tokens
    normed = model.forward_intermediates(x, indices=[2], norm=True, intermediates_only=True)
    tokens = torch.cat([final[:, :12], final[:, 13:]], dim=1)
    torch.testing.assert_close(normed[0].flatten(2).transpose(1, 2), tokens)
    nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert len(nlc) == 2 and nlc[0].shape == (2, 24, 32)
    torch.testing.assert_close(nlc[0].transpose(1, 2).reshape(2, 32, 4, 6), inter[1])
    early = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    torch.testing.assert_close(early[0], inter[0])
    with_cls = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert with_cls[0][1].shape == (2, 1, 32)


def test_inference_path_equals_the_autograd_forward():
    # without gradients the blocks take the fused add + norm (residual updated in place) and the mixer its
    # memory-ordered path (in_proj in two halves, delta_proj handed to the scan): same values as the autograd forward
    torch.manual_seed(0)
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 40)
    ref = model(x)
    with torch.no_grad():
        out = model(x)
    assert rel_err(out, ref) < 1e-6  # measured 0
    # forward_intermediates returns block outputs (residuals) that later blocks must not overwrite in place
    ref_final, ref_inter = model.forward_intermediates(x)
    with torch.inference_mode():
        final, inter = model.forward_intermediates(x)
        some = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert rel_err(final, ref_final) < 1e-6
    for got, want in zip(inter, ref_inter):
        assert rel_err(got, want) < 1e-6
    assert rel_err(some[0], ref_inter[0]) < 1e-6 and rel_err(some[1], ref_inter[2]) < 1e-6


TRITON_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not TRITON_HERE, reason="needs CUDA or the interpreter")
@pytest.mark.parametrize("scan_name", ["bidirectional", "cross"])
def test_triton_inference_op_equals_the_torch_backend(scan_name):
    # the model without gradients on the triton backend: add + RMSNorm kernel, then one fused mixer op per block
    # (in_proj, route convs, x_proj writing the scan's operand rows, delta formed in the scan, gate over z, out_proj)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = tiny(depth=2, scan=scan_name).to(dev).eval()
    x = torch.randn(1, 3, 32, 32, device=dev)
    with torch.no_grad():
        ref = model(x)
        model.set_scan_backend("triton")
        out = model(x)
        again = model(x)  # the packed weights are reused...
        model.layers[0].mixer.D.add_(0.5)  # ...until a weight changes
        changed = model(x)
        model.set_scan_backend("torch")
        changed_ref = model(x)
    assert rel_err(out, ref) < 1e-5  # measured 2e-7 (float32)
    assert torch.equal(again, out)
    assert rel_err(changed, changed_ref) < 1e-5 and rel_err(changed, out) > 1e-3


@pytest.mark.skipif(not TRITON_HERE, reason="needs CUDA or the interpreter")
@pytest.mark.parametrize("save_scan_states", [False, True])
def test_triton_training_op_equals_the_torch_backend(save_scan_states):
    # the fused training op of a block (vim_kernels.mamba_inner): outputs and every parameter's gradient of a sum
    # loss against the torch backend's PyTorch-ops path, with the backward recomputing the scan or reading its states
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = tiny(depth=1, embed_dim=16, save_scan_states=save_scan_states).to(dev)
    x = torch.randn(1, 3, 32, 32, device=dev)

    def run():
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = run()
    model.set_scan_backend("triton")
    out, grads = run()
    assert rel_err(out, ref) < 1e-5
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 1e-4, name  # measured below 1e-6 (float32)


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_patch_embed_equals_its_conv(size):
    # non-overlapping patches run as one GEMM over the flattened patches; the conv defines the result
    embed = PatchEmbed(32, 8, 8, 3, 16)
    x = torch.randn(2, 3, *size)
    tokens, grid = embed(x)
    assert grid == (size[0] // 8, size[1] // 8)
    assert rel_err(tokens, embed.proj(x).flatten(2).transpose(1, 2)) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, _ = embed(x)
        conv = embed.proj(x).flatten(2).transpose(1, 2)
    assert tokens.dtype == conv.dtype == torch.bfloat16
    assert rel_err(tokens.float(), conv.float()) < 1e-2  # measured 0; one bf16 rounding apart would be 4e-3


def test_features_only_through_timm():
    model = timm.create_model("vim_digits", features_only=True, out_indices=(1, 3), scan_backend="torch")
    feats = model(torch.randn(1, 3, 32, 32))
    assert [f.shape for f in feats] == [(1, 64, 8, 8)] * 2


def test_prune_intermediate_layers():
    model = tiny(depth=3)
    assert model.prune_intermediate_layers(indices=[0, 1], prune_norm=True) == [0, 1]
    assert len(model.layers) == 2 and model.num_classes == 0
    assert len(model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)) == 2


@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_no_weight_decay_lists_every_ssm_parameter(scan):
    model = tiny(scan=scan)
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    expected = {
        n
        for n in params
        if n.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "A_c_log", "A_cb_log", "D", "D_b", "D_c", "D_cb")
    }
    assert len(expected) == 2 * model.depth * model.scan_pattern.num_routes
    assert expected | {"pos_embed", "cls_token"} == names


def test_layer_decay_param_groups():
    model = tiny(depth=3)
    groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75
    )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    scales = {g["lr_scale"] for g in groups}
    assert len(scales) == 5  # stem, 3 blocks, norm_f/head
    a_log = model.layers[1].mixer.A_log
    group = next(g for g in groups if any(p is a_log for p in g["params"]))
    assert group["weight_decay"] == 0.0
    head = next(g for g in groups if any(p is model.head.weight for p in g["params"]))
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05


def test_drop_path_schedule_follows_the_official_offset():
    model = tiny(depth=4, drop_path_rate=0.3)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.layers]
    torch.testing.assert_close(torch.tensor(rates), torch.tensor([0.0, 0.0, 0.1, 0.2]))
    assert model.drop_path.drop_prob == pytest.approx(0.3)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_bf16_autocast_keeps_a_float32_residual_and_float32_accuracy():
    # against float32 with a sum loss; measured over seeds 0-3: logits 2.4e-3 to 5.4e-3, gradients median 8e-3,
    # worst 2.5e-2 to 5.1e-2 (the small dt_proj weights)
    torch.manual_seed(0)
    model = tiny(scan="cross").eval()
    x = torch.randn(2, 3, 32, 32)

    def run(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
        logits.float().sum().backward()
        return feats, logits.float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    _, logits32, grads32 = run(False)
    feats, logits, grads = run(True)
    assert feats.dtype == torch.float32
    assert rel_err(logits, logits32) < 2e-2
    for name, grad in grads32.items():
        assert rel_err(grads[name], grad) < 0.1, name


def test_reset_classifier():
    model = tiny()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)
