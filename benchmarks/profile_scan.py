"""Run the Triton scan forward+backward a few times at one shape, for a profiler (ncu) to capture its kernels.

ncu --kernel-name regex:_scan_ --launch-skip 4 --launch-count 2 --section WarpStateStats ... \
    python3 benchmarks/profile_scan.py --shape 128 768 197
Kernel variants: VIM_SCAN_CONFIG='{"bwd": {...}}' (see kernels/triton_scan.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import scan_inputs, triton_scan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 768, 197], metavar=("BATCH", "DIM", "L"))
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    inputs = scan_inputs(*args.shape)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    for _ in range(args.iters):
        out = triton_scan(**leaves)
        torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
