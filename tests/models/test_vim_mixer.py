"""Scan patterns, routes and the multi-route mixer: fused path == per-route path == an official-style oracle."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import vim_kernels
from model_reference import rel_err

from vision_mamba.models import scan
from vision_mamba.models.mixer import (
    SCAN_PATTERNS,
    MultiRouteMamba,
    ScanPattern,
    _forward_and_reversed,
    column_major,
    get_scan_pattern,
    register_scan_pattern,
    row_major,
    with_class_token,
)
from vision_mamba.models.vim import VisionMamba

GRIDS = [(3, 3), (2, 5), (4, 3)]
TRITON_HERE = vim_kernels.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


# ---- a test-local oracle, written the way hustvl/Vim + mamba_ssm compute it (flipped copies, two scans) -------------


def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """mamba_ssm semantics, one step at a time: u, delta, z (b, d, L); B, C (b, n, L); float32 state."""
    delta = F.softplus(delta.float() + delta_bias[None, :, None])
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[-1]):
        state = torch.exp(delta[..., t, None] * A) * state + delta[..., t, None] * B[:, None, :, t] * u[..., t, None]
        ys.append((state * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, dim=-1) + u * D[None, :, None]) * F.silu(z)


def official_mixer(m: MultiRouteMamba, hidden: torch.Tensor) -> torch.Tensor:
    """bimamba v2 with if_devide_out: both directions on their own copies, the backward one on flipped x and z."""
    length = hidden.shape[1]
    xz = (hidden @ m.in_proj.weight.t()).transpose(1, 2)  # (b, 2E, L)

    def direction(xz, conv, x_proj, dt_proj, a_log, d):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :length])  # nn.Conv1d with padding k-1, keep the first L: causal
        dt, b, c = torch.split(x_proj(x.transpose(1, 2)), [m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return naive_selective_scan(
            x, delta, -torch.exp(a_log), b.transpose(1, 2), c.transpose(1, 2), d, z, dt_proj.bias
        )

    out = direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    out_b = direction(xz.flip([-1]), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b)
    return F.linear((out + out_b.flip([-1])).transpose(1, 2) / 2, m.out_proj.weight)


def official_model(model: VisionMamba, img: torch.Tensor) -> torch.Tensor:
    """The official VisionMamba.forward (no fused add-norm, eval mode) around `official_mixer`."""

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x = model.patch_embed.proj(img).flatten(2).transpose(1, 2)
    pos = x.shape[1] // 2
    x = torch.cat([x[:, :pos], model.cls_token.expand(x.shape[0], -1, -1), x[:, pos:]], dim=1) + model.pos_embed
    hidden, residual = x, None
    for layer in model.layers:
        residual = hidden if residual is None else residual + hidden
        hidden = official_mixer(layer.mixer, rms(residual, layer.norm.weight))
    out = rms(residual + hidden, model.norm_f.weight)
    return model.head(out[:, pos])


# ---- routes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bidirectional", "cross"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("with_cls", [True, False])
def test_routes_are_permutations_with_the_class_token_in_the_middle(name, grid, with_cls):
    h, w = grid
    m = h * w
    cls_pos = m // 2 if with_cls else None
    routes = get_scan_pattern(name).routes(h, w, cls_pos, torch.device("cpu"))
    length = m + with_cls
    assert routes.index.shape == (get_scan_pattern(name).num_routes, length)
    for r, route in enumerate(routes.index):
        assert torch.equal(route.sort().values, torch.arange(length))
        assert torch.equal(route[routes.inverse[r]], torch.arange(length))  # inverse: token -> step
        if with_cls:  # forward routes visit the class token at step M // 2, reversed ones at L - 1 - M // 2
            step = cls_pos if r % 2 == 0 else length - 1 - cls_pos
            assert route[step] == cls_pos
    for r in range(1, routes.num_routes, 2):
        assert torch.equal(routes.index[r], routes.index[r - 1].flip(0))
    assert routes.kinds[:2] == ("identity", "reverse")
    assert get_scan_pattern(name).routes(h, w, cls_pos, torch.device("cpu")) is routes  # cached per grid


def test_column_major_route_with_class_token():
    # 2x3 grid, patches 0..5 row-major; cls inserted at token 3 -> tokens: p0 p1 p2 CLS p3 p4 p5 = 0 1 2 3 4 5 6
    routes = get_scan_pattern("cross").routes(2, 3, 3, torch.device("cpu"))
    # columns: (p0, p3), (p1, p4), (p2, p5) -> tokens 0 4 1 5 2 6; the cls token is visited at step 3
    assert routes.index[2].tolist() == [0, 4, 1, 3, 5, 2, 6]
    assert routes.index[3].tolist() == [6, 2, 5, 3, 1, 4, 0]
    assert routes.kinds[2:] == ("gather", "gather")


def test_register_a_new_pattern_needs_no_mixer_change():
    def zigzag(h, w, cls_pos, device=None):
        rows = torch.arange(h * w, device=device).view(h, w)
        order = torch.cat([row if i % 2 == 0 else row.flip(0) for i, row in enumerate(rows)])
        forward = with_class_token(order, cls_pos)
        return torch.stack([forward, forward.flip(0)])

    pattern = ScanPattern("test_zigzag", ("", "_zb"), zigzag)
    register_scan_pattern(pattern)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_scan_pattern(pattern)
        torch.manual_seed(0)
        m = MultiRouteMamba(16, "test_zigzag", scan_backend="torch")
        assert hasattr(m, "conv1d_zb") and hasattr(m, "A_zb_log") and hasattr(m, "D_zb")
        routes = pattern.routes(3, 4, 6, torch.device("cpu"))
        x = torch.randn(2, 13, 16)
        fused = m(x, routes)
        m.path = "reference"
        assert rel_err(fused, m(x, routes)) < 1e-5
    finally:
        SCAN_PATTERNS.pop("test_zigzag")


def test_bad_pattern_and_backend_names_are_clear():
    with pytest.raises(ValueError, match="unknown scan pattern 'diagonal'.*bidirectional"):
        MultiRouteMamba(16, "diagonal")
    with pytest.raises(ValueError, match="scan_backend must be one of auto, triton, torch, parallel, ref; got 'cuda'"):
        MultiRouteMamba(16, scan_backend="cuda")
    with pytest.raises(ValueError, match="only the 'mean' merge"):
        ScanPattern("x", ("",), lambda h, w, c: torch.arange(h * w)[None], merge="max")


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert scan.resolve_backend("auto", cpu) == "torch"
    assert scan.resolve_backend("ref", cpu) == "ref"
    assert not scan.triton_available(cpu)


# ---- mixer numerics -------------------------------------------------------------------------------------------------


def _grads(module, inp):
    return [inp.grad] + [p.grad for p in module.parameters()]


def _run(m, x, routes):
    x = x.clone().requires_grad_(True)
    m.zero_grad()
    out = m(x, routes)
    out.pow(2).sum().backward()
    return out.detach(), _grads(m, x)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("with_cls", [True, False])
def test_cross_fused_path_equals_per_route_reference(grid, with_cls):
    torch.manual_seed(0)
    h, w = grid
    cls_pos = (h * w) // 2 if with_cls else None
    m = MultiRouteMamba(16, "cross", scan_backend="torch")
    routes = m.pattern.routes(h, w, cls_pos, torch.device("cpu"))
    x = torch.randn(2, h * w + with_cls, 16)
    out_fused, g_fused = _run(m, x, routes)
    m.path = "reference"
    out_ref, g_ref = _run(m, x, routes)
    # float32, measured: outputs 1e-7, gradients (input and every parameter) up to 2.2e-7
    assert rel_err(out_fused, out_ref) < 1e-5
    for a, b in zip(g_fused, g_ref):
        assert rel_err(a, b) < 1e-5


def test_cross_has_named_parameters_per_route():
    names = dict(MultiRouteMamba(16, "cross").named_parameters())
    for s in ("", "_b", "_c", "_cb"):
        for n in (
            f"conv1d{s}.weight",
            f"conv1d{s}.bias",
            f"x_proj{s}.weight",
            f"dt_proj{s}.weight",
            f"dt_proj{s}.bias",
            f"D{s}",
        ):
            assert n in names
    assert {"A_log", "A_b_log", "A_c_log", "A_cb_log"} <= set(names)


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_bidirectional_mixer_equals_the_official_computation(path):
    torch.manual_seed(0)
    m = MultiRouteMamba(16, "bidirectional", scan_backend="torch", path=path)
    routes = m.pattern.routes(3, 4, 6, torch.device("cpu"))
    x = torch.randn(2, 13, 16, requires_grad=True)
    out = m(x, routes)
    (g_x,) = torch.autograd.grad(out.pow(2).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    expected = official_mixer(m, x2)
    (g_x2,) = torch.autograd.grad(expected.pow(2).sum(), x2)
    assert rel_err(out, expected) < 1e-5  # measured 1e-7
    assert rel_err(g_x, g_x2) < 1e-5  # measured 1.3e-7


def test_bidirectional_model_equals_the_official_forward():
    torch.manual_seed(0)
    model = VisionMamba(
        img_size=(20, 12), patch_size=4, embed_dim=32, depth=2, num_classes=5, scan_backend="torch"
    ).eval()
    img = torch.randn(2, 3, 20, 12)
    assert rel_err(model(img), official_model(model, img)) < 1e-5  # measured 1.7e-7


def test_mixer_under_bf16_autocast():
    torch.manual_seed(0)
    m = MultiRouteMamba(16, "cross", scan_backend="torch")
    routes = m.pattern.routes(3, 3, 4, torch.device("cpu"))
    x = torch.randn(2, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, routes)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), m(x, routes)) < 2e-2  # measured 4.8e-3 to 6.2e-3 over seeds 0-2


def test_row_major_is_the_official_order():
    assert torch.equal(row_major(2, 3), torch.arange(6))


def test_routes_cached_in_inference_mode_can_be_used_for_training():
    """Lightning validates under inference_mode before training: the cached routes must stay usable by autograd."""
    import timm

    model = timm.create_model("vim_digits", depth=1, img_size=24, patch_size=8, scan_backend="torch")
    x = torch.randn(2, 3, 24, 24)
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None


def test_route_builder_gives_each_order_then_its_reverse_on_the_given_device():
    # 2x3 grid, patches p0..p5 row-major; with the class token at step 3: tokens p0 p1 p2 CLS p3 p4 p5 = 0..6
    build = _forward_and_reversed(row_major, column_major)
    assert build(2, 3, 3).tolist() == [
        [0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [0, 4, 1, 3, 5, 2, 6], [6, 2, 5, 3, 1, 4, 0]
    ]
    assert build(2, 3, None).tolist() == [
        [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 3, 1, 4, 2, 5], [5, 2, 4, 1, 3, 0]
    ]
    # under torch.compile the routes are built on the activations' device (no host-to-device copy)
    meta = torch.device("meta")
    assert build(2, 3, 3, meta).device == meta and column_major(2, 3, meta).device == meta


def test_route_suffixes_must_start_with_the_plain_names_and_be_unique():
    build = _forward_and_reversed(row_major)
    for suffixes in [(), ("_f", "_b"), ("", "")]:
        with pytest.raises(ValueError) as info:
            ScanPattern("bad", suffixes, build)
        assert str(info.value) == "scan pattern 'bad': suffixes must be unique and start with ''"


def test_orders_keep_the_device_and_the_class_token_keeps_the_integer_dtype():
    meta = torch.device("meta")
    assert row_major(2, 3, meta).device == meta and column_major(2, 3, meta).device == meta
    tokens = with_class_token(row_major(2, 3, meta), 3)
    assert tokens.device == meta and tokens.dtype == torch.int64
    # the routes index tokens: a float class entry would turn the whole route into floats
    tokens = with_class_token(torch.tensor([5, 0, 3, 1]), 2)  # patch p is token p + (p >= 2); the class token is 2
    assert tokens.dtype == torch.int64 and tokens.tolist() == [6, 0, 2, 4, 1]


def test_routes_carry_int32_copies_of_both_maps_for_the_kernels():
    # a fresh pattern: its routes are built here, not taken from another test's cache
    pattern = ScanPattern("test_int32", ("", "_b", "_c", "_cb"), _forward_and_reversed(row_major, column_major))
    routes = pattern.routes(2, 3, 3, torch.device("cpu"))
    assert routes.index[3].tolist() == [6, 2, 5, 3, 1, 4, 0]
    assert routes.inverse[3].tolist() == [6, 4, 1, 3, 5, 2, 0]  # token t is visited at step inverse[t]
    assert routes.index.dtype == routes.inverse.dtype == torch.int64
    assert routes.index32.dtype == routes.inverse32.dtype == torch.int32
    assert torch.equal(routes.index32.long(), routes.index) and torch.equal(routes.inverse32.long(), routes.inverse)


def test_routes_are_checked_and_built_on_the_cpu_whatever_the_default_device():
    """torch.set_default_device("cuda") users: the routes are still checked on the host, then moved once."""
    pattern = ScanPattern("test_default_device", ("", "_b"), _forward_and_reversed(row_major))
    with torch.device("meta"):  # the default device for factory calls without one
        routes = pattern.routes(2, 3, 3, torch.device("cpu"))
    assert routes.index.device == torch.device("cpu") and routes.kinds == ("identity", "reverse")
    assert routes.index.tolist() == [[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]]


def test_a_bad_route_builder_is_named_with_what_it_built():
    def wrong_length(h, w, cls_pos, device=None):
        return torch.stack([torch.arange(h * w, device=device)] * 2)  # forgets the class token

    def repeats_a_token(h, w, cls_pos, device=None):
        route = torch.arange(h * w + 1, device=device)
        route[-1] = 0
        return torch.stack([route, route.flip(0)])

    with pytest.raises(ValueError) as info:
        ScanPattern("short", ("", "_b"), wrong_length).routes(2, 3, 3, torch.device("cpu"))
    assert str(info.value) == "scan pattern 'short' built routes of shape (2, 6), expected (2, 7)"
    with pytest.raises(ValueError) as info:
        ScanPattern("repeats", ("", "_b"), repeats_a_token).routes(2, 3, 3, torch.device("cpu"))
    assert str(info.value) == "scan pattern 'repeats': every route must be a permutation of the 7 tokens"


# ---- the triton backend's fused ops (interpreted on the CPU) --------------------------------------------------------


def _distinct_routes(m: MultiRouteMamba) -> MultiRouteMamba:
    """Every parameter random, so that no two routes share a value (the init gives them equal A_log and D)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "A" in name and "log" in name else torch.randn_like(p) * 0.3)
    return m


@pytest.mark.skipif(not TRITON_HERE, reason="needs CUDA or the Triton interpreter")
def test_triton_fused_ops_equal_the_per_route_reference_with_and_without_gradients():
    m = _distinct_routes(MultiRouteMamba(16, "cross", scan_backend="triton"))
    reference = MultiRouteMamba(16, "cross", scan_backend="torch", path="reference")
    reference.load_state_dict(m.state_dict())
    routes = m.pattern.routes(2, 3, 3, torch.device("cpu"))
    x = torch.randn(1, 7, 16)
    expected = reference(x, routes).detach()
    out = m(x, routes)  # mamba_inner: the training op
    assert out.requires_grad and rel_err(out, expected) < 1e-5  # measured 3.4e-7
    with torch.no_grad():  # mamba_mixer_inference with the packed weights
        assert rel_err(m(x, routes), expected) < 1e-5  # measured 3.4e-7


def test_inference_weights_are_packed_once_and_again_when_a_weight_or_the_dtype_changes():
    m = _distinct_routes(MultiRouteMamba(16, "cross", scan_backend="triton"))

    def stacked(name):  # a per-route parameter stacked over the routes, by its official names
        return torch.stack([m.get_parameter(name.format(s)) for s in m.pattern.suffixes])

    def assert_packs_the_weights(w, dtype):
        assert torch.equal(w.in_proj, m.in_proj.weight.to(dtype)) and torch.equal(w.out_proj, m.out_proj.weight.to(dtype))
        assert torch.equal(w.conv_w, stacked("conv1d{}.weight").squeeze(2)) and torch.equal(w.conv_b, stacked("conv1d{}.bias"))
        assert torch.equal(w.dt_proj, stacked("dt_proj{}.weight").to(dtype)) and torch.equal(w.dt_bias, stacked("dt_proj{}.bias"))
        assert torch.equal(w.D, stacked("D{}"))

    w = m._inference_weights(torch.float32)
    assert_packs_the_weights(w, torch.float32)
    assert m._inference_weights(torch.float32) is w  # kept while nothing changes
    m.D_c.grad = torch.ones_like(m.D_c)
    torch.optim.SGD([m.D_c], lr=1.0).step()  # an in-place update: the weight's version changes
    w2 = m._inference_weights(torch.float32)
    assert w2 is not w and torch.equal(w2.D[2], m.D_c.detach()) and m._inference_weights(torch.float32) is w2
    m.D_b.data = torch.full_like(m.D_b, 3.0)  # new storage
    assert_packs_the_weights(m._inference_weights(torch.float32), torch.float32)
    w16 = m._inference_weights(torch.bfloat16)
    assert w16.in_proj.dtype == torch.bfloat16
    assert_packs_the_weights(w16, torch.bfloat16)
