"""Cost of the cross-scan pattern: forward+backward time of one Vim-S mixer block, `bidirectional` vs `cross`.

    python benchmarks/cross_scan.py            # GPU: 224 (batch 64) and 1024 (batch 8), JSON to benchmarks/results/
    python benchmarks/cross_scan.py --quick    # CPU smoke run at tiny sizes

The cross pattern scans four routes instead of two, so its scan work doubles; the routes are index maps, so a cross
block should cost at most ~2.2x a bidirectional one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_gib, time_ms, write_result  # noqa: E402

from vision_mamba.models.mixer import MultiRouteMamba, get_scan_pattern  # noqa: E402
from vision_mamba.models.vim import MambaBlock  # noqa: E402


def bench(pattern: str, img_size: int, batch: int, dim: int, device, args) -> dict:
    grid = img_size // 16
    length = grid * grid + 1
    block = MambaBlock(dim, MultiRouteMamba(dim, pattern=pattern, num_layers=24, scan_backend=args.scan_backend)).to(
        device
    )
    routes = get_scan_pattern(pattern).routes(grid, grid, (grid * grid) // 2, device)
    hidden = torch.randn(batch, length, dim, device=device, requires_grad=True)
    residual = torch.randn(batch, length, dim, device=device, requires_grad=True)

    def fwd_bwd():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out, res = block(hidden, residual, routes)
        (out.float().square().mean() + res.float().mean()).backward()

    def fwd():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            block(hidden, residual, routes)

    return {
        "pattern": pattern,
        "img_size": img_size,
        "batch": batch,
        "tokens": length,
        "dim": dim,
        "forward_ms": time_ms(fwd, warmup=args.warmup, iters=args.iters),
        "forward_backward_ms": time_ms(fwd_bwd, warmup=args.warmup, iters=args.iters),
        "peak_mem_gib": peak_memory_gib(fwd_bwd),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scan-backend", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    cases = [(64, 2, 32)] if args.quick else [(224, 64, 384), (1024, 8, 384)]
    rows = [
        bench(pattern, size, batch, dim, device, args)
        for size, batch, dim in cases
        for pattern in ("bidirectional", "cross")
    ]
    ratios = {}
    for size, _, _ in cases:
        bi, cr = (
            next(r for r in rows if r["img_size"] == size and r["pattern"] == pat) for pat in ("bidirectional", "cross")
        )
        ratios[f"cross_over_bidirectional_fwd_bwd_at_{size}"] = cr["forward_backward_ms"] / bi["forward_backward_ms"]
    path = write_result("cross_scan" + ("_quick" if args.quick else ""), {"rows": rows, "summary": ratios}, args.out)
    print(f"\nwritten {path}\n{'pattern':<15}{'size':>6}{'batch':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    for r in rows:
        print(
            f"{r['pattern']:<15}{r['img_size']:>6}{r['batch']:>6}{r['forward_ms']:>10.3f}{r['forward_backward_ms']:>12.3f}"
        )
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":
    main()
