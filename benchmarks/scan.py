"""The selective-scan micro-benchmark: forward and forward+backward time of the scan at the benchmark table's shapes,
single-route and over Vim's routes, for ours (Triton, the default launch config), the `torch` backend and
mamba_ssm's CUDA scan.

    python benchmarks/scan.py                        # GPU; JSON to benchmarks/results/scan_<card>.json
    python benchmarks/scan.py --mamba-build DIR      # with mamba_ssm's kernel built by tools/mamba_ssm_cuda.py
    python benchmarks/scan.py --config chunk=8       # a variant of the default launch config (vim_kernels.ScanConfig)
    python benchmarks/scan.py --device cpu --quick   # a smoke run at tiny shapes (torch backend)

Shapes (batch, dim, L): Vim-Ti and Vim-S at 224 px, batch 128 (dim = the mixer's inner width, L = 14 x 14 patches +
the class token), and Vim-Ti at 1248 px, batch 16 (78 x 78 + 1 tokens). Route rows run all routes of one mixer in
one call: `bidirectional` (a route and its reverse) and `cross` (rows and columns, each both ways). Inputs are
channel-last bf16 activations, as the model's projections produce them. Times: CUDA events around back-to-back
calls (median of 3 rounds) and the GPU kernel time alone (profiler). mamba_ssm's kernel has no routes: its route
rows time R calls on inputs already gathered into each route's order (the gathers and the merge not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import vim_kernels as vk  # noqa: E402
from common import gpu_busy_ms, print_rows, time_ms, write_result  # noqa: E402

N_STATE = 16
SHAPES = [(128, 384, 197), (128, 768, 197), (16, 384, 6085)]
QUICK_SHAPES = [(2, 16, 17), (1, 8, 37)]
PATTERNS = {1: None, 2: "bidirectional", 4: "cross"}
# the torch backend's recurrence is a Python loop over L: beyond this much work (batch x dim x L x routes) it is
# left out, as no one would run it there
TORCH_MAX_WORK = 2 * 128 * 768 * 197


def scan_inputs(routes: int, batch: int, dim: int, length: int, device, dtype, seed: int = 0) -> dict:
    """Inputs of `routes` scans over the same tokens: single-route in mamba_ssm's layout (u, delta, z, B, C as
    (batch, channels, L) views of channel-last activations), multi-route in vim_kernels' token order."""
    g = torch.Generator(device=device).manual_seed(seed)

    def act(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    if routes == 1:
        return dict(
            u=act(batch, length, dim).transpose(1, 2),
            delta=act(batch, length, dim, scale=0.5).transpose(1, 2),
            A=-torch.exp(torch.rand(dim, N_STATE, device=device, generator=g)),
            B=act(batch, length, N_STATE).transpose(1, 2),
            C=act(batch, length, N_STATE).transpose(1, 2),
            D=torch.randn(dim, device=device, generator=g),
            z=act(batch, length, dim).transpose(1, 2),
            delta_bias=torch.rand(dim, device=device, generator=g) - 1.0,
        )
    return dict(
        u=act(routes, batch, length, dim),
        delta=act(routes, batch, length, dim, scale=0.5),
        A=-torch.exp(torch.rand(routes, dim, N_STATE, device=device, generator=g)),
        B=act(routes, batch, length, N_STATE),
        C=act(routes, batch, length, N_STATE),
        D=torch.randn(routes, dim, device=device, generator=g),
        z=act(batch, length, dim),
        delta_bias=torch.rand(routes, dim, device=device, generator=g) - 1.0,
    )


def route_index(routes: int, length: int, device) -> torch.Tensor:
    """The (routes, L) visiting order of the model's scan pattern for a square grid with the class token mid-way."""
    from vision_mamba.models import SCAN_PATTERNS

    grid = math.isqrt(length - 1)
    if grid * grid + 1 != length:
        raise ValueError(f"L={length} is no square grid plus a class token")
    return SCAN_PATTERNS[PATTERNS[routes]].routes(grid, grid, grid * grid // 2, device).index


def time_fwd_bwd(fwd_fn, train_fn, inputs: dict, warmup: int, iters: int) -> dict:
    """Forward (no grad, `fwd_fn`) and forward+backward (`train_fn`, gradients of every input) times: CUDA events
    and GPU kernel time."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    grad = torch.randn_like(train_fn(**leaves))

    def fwd():
        with torch.no_grad():
            fwd_fn(**inputs)

    def step():
        torch.autograd.grad(train_fn(**leaves), list(leaves.values()), grad)

    return {
        "fwd_ms": time_ms(fwd, warmup=warmup, iters=iters),
        "fwd_bwd_ms": time_ms(step, warmup=warmup, iters=iters),
        "fwd_gpu_ms": gpu_busy_ms(fwd, iters),
        "fwd_bwd_gpu_ms": gpu_busy_ms(step, iters),
    }


def parse_config(text: str | None) -> dict:
    """`chunk=8,fwd=split` -> {"chunk": 8, "fwd": "split"}: fields of vim_kernels.ScanConfig to replace."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        out[name.strip()] = (
            int(value)
            if value.strip().lstrip("-").isdigit()
            else {"true": True, "false": False}.get(value.strip().lower(), value.strip())
        )
    return out


def launch_configs(overrides: dict, routes: int, batch: int, dim: int, length: int, device) -> dict:
    """The forward-only and training launch configs of our kernels at one shape: vim_kernels.select_config's
    choice, with `overrides` replaced. Empty where the installed kernels choose their launch internally."""
    if not hasattr(vk, "select_config"):
        if overrides:
            raise SystemExit("--config needs vim_kernels.ScanConfig, which these kernels do not have")
        return {}
    return {
        phase: dataclasses.replace(vk.select_config(batch, dim, routes, length, N_STATE, grad, device), **overrides)
        for phase, grad in (("fwd", False), ("fwd_bwd", True))
    }


def ours(backend: str, routes: int, index: torch.Tensor | None, config=None):
    kw = {"backend": backend} if config is None else {"backend": backend, "config": config}
    if routes == 1:
        return lambda **t: vk.selective_scan(**t, delta_softplus=True, **kw)
    return lambda **t: vk.multi_route_selective_scan(**t, routes=index, delta_softplus=True, **kw)


def mamba(scan_fn, routes: int):
    """mamba_ssm's kernel over `routes` scans of inputs already in route order: (routes, batch, dim, L), L unit-stride."""
    if routes == 1:
        return lambda **t: scan_fn(**t, delta_softplus=True)

    def run(u, delta, A, B, C, D, z, delta_bias):
        return sum(scan_fn(u[r], delta[r], A[r], B[r], C[r], D[r], z, delta_bias[r], True) for r in range(routes))

    return run


def mamba_inputs(inputs: dict, routes: int) -> dict:
    """Our inputs in mamba_ssm's layout: channels before L, L contiguous (made outside the timing)."""
    if routes == 1:
        return {k: v.contiguous() for k, v in inputs.items()}
    seq = {k: inputs[k].transpose(-1, -2).contiguous() for k in ("u", "delta", "B", "C")}
    return {**seq, "A": inputs["A"], "D": inputs["D"], "delta_bias": inputs["delta_bias"],
            "z": inputs["z"].transpose(1, 2).contiguous()}  # fmt: skip


def measure(args, device) -> list[dict]:
    import mamba_ssm_cuda

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scan_fn = mamba_ssm_cuda.scan_fn(args.mamba_build) if device.type == "cuda" else None
    if args.mamba_build and scan_fn is None:
        raise SystemExit(f"no checked mamba_ssm build in {args.mamba_build}: run tools/mamba_ssm_cuda.py first")
    overrides = parse_config(args.config)
    rows = []
    for (batch, dim, length), routes in [(s, r) for s in args.shapes for r in args.routes]:
        inputs = scan_inputs(routes, batch, dim, length, device, dtype)
        index = route_index(routes, length, device) if routes > 1 else None
        for backend in args.backends:
            row = {"shape": [batch, dim, length], "routes": routes, "pattern": PATTERNS[routes], "backend": backend}
            if (backend == "mamba_ssm" and scan_fn is None) or (
                backend == "torch" and batch * dim * length * routes > TORCH_MAX_WORK
            ):
                continue
            try:
                if backend == "mamba_ssm":
                    fn = mamba(scan_fn, routes)
                    row.update(time_fwd_bwd(fn, fn, mamba_inputs(inputs, routes), args.warmup, args.iters))
                else:
                    configs = (
                        launch_configs(overrides, routes, batch, dim, length, device) if backend == "triton" else {}
                    )
                    # without overrides the kernels pick their default themselves; the row records what it was
                    fwd_fn, train_fn = (ours(backend, routes, index, configs.get(p) if overrides else None)
                                        for p in ("fwd", "fwd_bwd"))  # fmt: skip
                    # the torch backend's Python loop over L takes ~100x longer a call: fewer calls suffice
                    iters = args.iters if backend == "triton" else max(2, args.iters // 5)
                    row.update(time_fwd_bwd(fwd_fn, train_fn, inputs, min(args.warmup, iters), iters))
                    row["config"] = {k: dataclasses.asdict(v) for k, v in configs.items()} or None
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            rows.append(row)
            print(row, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del inputs
    triton = {(tuple(r["shape"]), r["routes"]): r for r in rows if r["backend"] == "triton" and "fwd_bwd_ms" in r}
    for r in rows:  # each backend against ours at the same shape
        base = triton.get((tuple(r["shape"]), r["routes"]))
        if base and "fwd_bwd_ms" in r and r["backend"] != "triton":
            r["fwd_vs_triton"] = r["fwd_ms"] / base["fwd_ms"]
            r["fwd_bwd_vs_triton"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    return rows


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few iterations (a smoke run)")
    p.add_argument("--shapes", nargs="*", default=None, metavar="B,D,L", help="default: the table's shapes")
    p.add_argument("--routes", type=int, nargs="*", default=[1, 2, 4], choices=sorted(PATTERNS))
    p.add_argument("--backends", nargs="*", default=None, choices=("triton", "torch", "mamba_ssm"),
                   help="default: triton, torch and mamba_ssm on CUDA; torch on the CPU")  # fmt: skip
    p.add_argument("--config", default=None, help="ScanConfig fields to replace in our default, e.g. chunk=8")
    p.add_argument(
        "--mamba-build", default=None, help="folder of a selective_scan_cuda build (tools/mamba_ssm_cuda.py)"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.shapes:
        args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    else:
        args.shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.warmup, args.iters = 1, 2
    args.backends = args.backends or (["triton", "torch", "mamba_ssm"] if device.type == "cuda" else ["torch"])
    rows = measure(args, device)
    path = write_result("scan", rows, args.out, key=("shape", "routes", "backend"), quick=args.quick)
    print(f"\nwritten {path}")
    print_rows(rows, ["shape", "routes", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_gpu_ms", "fwd_bwd_gpu_ms",
                      "fwd_bwd_vs_triton", "error"])  # fmt: skip
    return path


if __name__ == "__main__":
    main()
