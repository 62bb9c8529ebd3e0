"""Builds every Triton kernel launch the GPU defaults make for an H100 (sm_90: PTX through ptxas to a cubin) on a
machine without a GPU, and prints what was built as JSON.

The interpreter tests run the kernels' arithmetic on the CPU, but never the code that only a GPU build takes: the
fast approximate math (inline PTX), the L2 prefetch and the register cap. Here a stand-in CUDA driver names sm_90 as
the target and every launch stops after compilation (Triton's warm-up), so the kernels return unwritten buffers:
nothing is checked but that each launch the defaults choose compiles. The launch configurations are
select_config's for the shapes users run (vim_tiny / small / base at 224, 1248 and the stride-8 variants, batch 1
to 128, two and four routes, training and inference); each distinct one runs through the public ops at a tiny size
(the configuration, not the size, fixes the compiled code), then a Vim model trains a step and infers through the
default path. Run as a script (`python tests/kernels/sm90_build.py`), without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

# (batch, d_inner, tokens) of the models users run: vim_tiny/small/base at 224 (197 tokens), at 1248 (6085) and the
# stride-8 variants at 224 (785); batch 128 (training), 8, 1 (latency), 16 at 1248
USER_SHAPES = [(b, e, n) for e in (384, 768, 1536) for b in (128, 8, 1) for n in (197, 785)] + [
    (b, e, 6085) for e in (384, 768) for b in (16, 1)
]
D_STATE = 16


class CompileOnlyCuda:
    """The driver Triton asks for the device, stream and target: sm_90, and no device behind it."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


def install(built: list[dict]) -> None:
    """Every launch compiles for sm_90 and is recorded instead of run; the ops' CUDA-tensor check is lifted."""
    import vim_kernels.backends
    import vim_kernels.interface

    triton.runtime.driver.set_active(CompileOnlyCuda())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        constants = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int)) and k.isupper()}
        built.append({"kernel": self.fn.__name__, "cubin_bytes": len(kernel.asm["cubin"]), **constants})
        return kernel

    JITFunction.run = compile_only
    vim_kernels.backends.require_triton = vim_kernels.interface.require_triton = lambda x: None


def mixer_inputs(R: int, L: int, E: int = 32, N: int = D_STATE, rank: int = 4):
    g = torch.Generator().manual_seed(0)
    p = dict(
        conv_w=torch.randn(R, E, 4, generator=g), conv_b=torch.randn(R, E, generator=g),
        x_proj_w=torch.randn(R, rank + 2 * N, E, generator=g), dt_proj_w=torch.randn(R, E, rank, generator=g),
        dt_bias=torch.randn(R, E, generator=g), A_log=torch.randn(R, E, N, generator=g), D=torch.randn(R, E, generator=g),
    )  # fmt: skip
    index = torch.stack([torch.randperm(L, generator=g) for _ in range(R)])
    return p, (index, index.int(), torch.argsort(index, dim=1).int())


def build_ops(config, routes: int, needs_grad: bool) -> None:
    import vim_kernels as vk

    L = config.seg + 8 if config.fwd == "split" else 20  # a split launches only for sequences beyond one segment
    p, route = mixer_inputs(routes, L)
    E = p["conv_w"].shape[1]
    xz = torch.randn(2, L, 2 * E, dtype=torch.bfloat16)
    if needs_grad:
        ps = {k: v.requires_grad_() for k, v in p.items()}
        x = xz.requires_grad_()
        vk.mamba_inner(x[..., :E], x[..., E:], *ps.values(), *route, config=config).float().sum().backward()
    else:
        w = vk.pack_mixer_weights(torch.randn(2 * E, 24), *p.values(), torch.randn(24, E), torch.bfloat16)
        with torch.no_grad():
            vk.mamba_mixer_inference(torch.randn(2, L, 24, dtype=torch.bfloat16), w, *route, config=config)


def build_model() -> None:
    import timm

    import vision_mamba.models  # noqa: F401  (registers the Vim models with timm)

    for scan in ("bidirectional", "cross"):
        model = timm.create_model("vim_tiny_patch16_224", img_size=64, scan=scan, scan_backend="triton")
        x = torch.randn(2, 3, 64, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.eval()(x)


def main() -> None:
    import vim_kernels as vk

    built: list[dict] = []
    install(built)
    cases = sorted(
        {(vk.select_config(b, e, r, n, D_STATE, g, "cuda"), r, g) for b, e, n in USER_SHAPES for r in (2, 4)
         for g in (True, False)},
        key=str,
    )  # fmt: skip
    for config, routes, needs_grad in cases:
        build_ops(config, routes, needs_grad)
    vk.selective_scan(*(torch.randn(2, 32, 20) for _ in range(2)), -torch.rand(32, D_STATE),
                      torch.randn(2, D_STATE, 20), torch.randn(2, D_STATE, 20), torch.randn(32), torch.randn(2, 32, 20),
                      torch.randn(32), delta_softplus=True, backend="triton")  # fmt: skip
    build_model()
    cases_json = [{"config": asdict(c), "routes": r, "needs_grad": g} for c, r, g in cases]
    print(json.dumps({"cases": cases_json, "built": built}))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: this builds for the GPU")
    main()
