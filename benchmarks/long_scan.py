"""The bidirectional scan's inference forward at long L, where the grid is small: variants timed in GPU time.

vim_tiny at 1248 px, batch 16, runs R 2 routes of (16, 384, 6085) per block: 384 programs of 32 channels, too few
to hide the one-step forward's load latency, so the default splits L into segments (two launches, twice the
exponentials). Each variant here is checked against the sequential reference first (at (2, 384, 1100), also a
small grid) and must agree with the default at the full shape; then its GPU time per call is measured.

    python benchmarks/long_scan.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vim_kernels as vk  # noqa: E402
from common import gpu_busy_ms, time_ms, write_result  # noqa: E402
from scan import route_inputs  # noqa: E402
from vim_kernels import triton_scan as ts  # noqa: E402


def split(seg, BD=32, T=8, **kw):
    return {"kind": "split", "SEG": seg, "T": T, "BD": BD, "num_warps": 1, "PREFETCH": 16, **kw}


def seq(BD, w=1, depth=4, prefetch=16, **kw):
    return {"kind": "seq", "T": 8, "BD": BD, "num_warps": w, "DEPTH": depth, "PREFETCH": prefetch, **kw}


VARIANTS = {
    "split SEG256 BD32 (default)": split(256),
    "split SEG128 BD32": split(128),
    "split SEG512 BD32": split(512),
    "split SEG512 BD16": split(512, BD=16),
    "split SEG1024 BD8": split(1024, BD=8),
    "seq BD32": seq(32),
    "seq BD16": seq(16),
    "seq BD8": seq(8),
    "seq BD8 prefetch32": seq(8, prefetch=32),
    "seq BD4": seq(4),
    "seq BD16 depth2": seq(16, depth=2),
    "seq BD16 w2": seq(16, w=2),
}


def bidir(inputs):
    L = inputs["u"].shape[2]
    ar = torch.arange(L, device="cuda")
    return vk.multi_route_selective_scan(**inputs, routes=torch.stack([ar, ar.flip(0)]), backend="triton")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="16,384,6085", help="batch,dim,L")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batch, dim, L = (int(v) for v in args.shape.split(","))
    small = route_inputs(2, 2, 384, 1100, dtype=torch.float32, seed=1)
    ref = vk.multi_route_selective_scan_ref(
        **small, routes=torch.stack([torch.arange(1100, device="cuda"), torch.arange(1100, device="cuda").flip(0)])
    )
    inputs = route_inputs(2, batch, dim, L)
    default_small = dict(ts._FWD_SMALL_GRID)
    with torch.inference_mode():
        base = bidir(inputs).float()
    rows = []
    for name, cfg in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        ts._FWD_SMALL_GRID.clear()
        ts._FWD_SMALL_GRID.update(cfg)
        row = {"name": name, "fwd": cfg}
        try:
            with torch.inference_mode():
                row["err_vs_ref_fp32"] = rel(bidir(small), ref)
                row["err_vs_default_bf16"] = rel(bidir(inputs).float(), base)

                def fwd():
                    bidir(inputs)

                row["gpu_ms"] = gpu_busy_ms(fwd, args.iters)
                row["events_ms"] = time_ms(fwd, iters=args.iters)
            row["ok"] = row["err_vs_ref_fp32"] < 1e-4 and row["err_vs_default_bf16"] < 1e-2
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(row, flush=True)
    ts._FWD_SMALL_GRID.clear()
    ts._FWD_SMALL_GRID.update(default_small)
    path = write_result(
        "long_scan", {"shape": [batch, dim, L], "routes": 2, "variants": rows}, args.out and Path(args.out)
    )
    print(f"\nresults: {path}\n{'variant':>30} {'GPU ms':>8} {'events':>8} {'err ref':>9} {'err dflt':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:>30} {r['error'][:80]}")
        else:
            print(f"{r['name']:>30} {r['gpu_ms']:8.3f} {r['events_ms']:8.3f} {r['err_vs_ref_fp32']:9.1e} "
                  f"{r['err_vs_default_bf16']:9.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
