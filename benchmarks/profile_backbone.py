"""Where a backbone's inference time goes: the GPU kernels of a few forward passes (torch.profiler), largest first.

python benchmarks/profile_backbone.py --model vim_tiny_patch16_224 --img-size 1248 --batch 16 [--memory] [--out DIR]

writes profile_<model>_<size>_<card>.json (model without "_patch16_224") with the card, versions, command and date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import vision_mamba.models  # noqa: E402,F401  (registers the Vim variants)


def _our_frame(frames: list[dict]) -> str:
    # the innermost frame in this project's code (the model or the kernels' host side), else the innermost one
    for f in frames:
        if "vision_mamba" in f["filename"] or "vim_kernels" in f["filename"] or "/kernels/" in f["filename"]:
            return f"{Path(f['filename']).name}:{f['line']} {f['name']}"
    return f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def memory_at_peak(run) -> dict:
    """Replay one pass's allocator trace: the peak of allocated memory, and the tensors alive at that moment grouped
    by the line of our code that allocated them (what to free earlier or not to materialise)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    run()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _our_frame(e.get("frames", [])))
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    by_line: dict[str, int] = {}
    for size, where in at_peak.values():
        by_line[where] = by_line.get(where, 0) + size
    mib = 2**20
    out = {
        "before_pass_mib": base / mib,
        "peak_mib": (base + peak) / mib,
        "alive_at_peak_mib": {k: v / mib for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])},
    }
    print(
        f"memory: {base / mib:.0f} MiB before the pass (weights, input), peak {(base + peak) / mib:.0f} MiB; alive at the peak:"
    )
    for k, v in out["alive_at_peak_mib"].items():
        print(f"  {v:8.1f} MiB  {k}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vim_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=1248)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None, help="write the table as JSON into this folder")
    p.add_argument("--memory", action="store_true", help="also: the tensors alive at the peak of one pass, by line")
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
    result = {"args": vars(args), "kernels": rows}
    if args.memory:
        result["memory_at_peak"] = memory_at_peak(run)
    if args.out:
        name = f"profile_{args.model.removesuffix('_patch16_224')}_{args.img_size}"
        print("written", write_result(name, result, Path(args.out)))


if __name__ == "__main__":
    main()
