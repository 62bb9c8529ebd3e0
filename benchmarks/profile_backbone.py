"""Where a backbone's inference time goes: the GPU kernels of a few forward passes (torch.profiler), largest first.

    python benchmarks/profile_backbone.py --model vim_tiny_patch16_224 --img-size 1248 --batch 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import vision_mamba.models  # noqa: F401  (registers the Vim variants)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vim_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=1248)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None, help="write the table as JSON into this folder")
    args = p.parse_args()
    model = timm.create_model(args.model, img_size=args.img_size).cuda().eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device="cuda")

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    rows = sorted(
        (
            {
                "kernel": e.key[:90],
                "ms_per_pass": e.device_time_total / 1e3 / args.iters,
                "share": e.device_time_total / total,
                "calls_per_pass": e.count / args.iters,
            }
            for e in events
        ),
        key=lambda r: -r["ms_per_pass"],
    )
    print(f"{args.model} {args.img_size} batch {args.batch}: {total / 1e3 / args.iters:.2f} ms of GPU kernels per pass")
    for r in rows[: args.top]:
        print(f"{r['ms_per_pass']:8.3f} ms {100 * r['share']:5.1f}% x{r['calls_per_pass']:<5.0f} {r['kernel']}")
    if args.out:
        path = Path(args.out) / f"profile_{args.model}_{args.img_size}.json"
        path.write_text(json.dumps({"args": vars(args), "kernels": rows}, indent=2))


if __name__ == "__main__":
    main()
