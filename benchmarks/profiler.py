"""Where one pass spends its time and memory: the kernel table (torch.profiler) of a model's inference or training
step, or of the scan alone, and the tensors alive at the pass's memory peak, grouped by the line that made them.

    python benchmarks/profiler.py --model vim_tiny --img-size 1248 --batch 16 --memory
    python benchmarks/profiler.py --model vim_small --img-size 224 --batch 128 --train --memory
    python benchmarks/profiler.py --scan 128,768,197 --routes 2      # the scan's forward+backward alone
    python benchmarks/profiler.py --device cpu --quick               # a smoke run (CPU operators, no memory)

With --scan it also suits Nsight Compute: `ncu --kernel-name regex:scan --launch-skip 4 --launch-count 2 python
benchmarks/profiler.py --scan 128,768,197 --no-write`. Rows: one per kernel ("kernel": GPU time per pass, share,
calls), one per line of code holding memory at the peak ("alive_at_peak", CUDA only) and one "total"; each row
names its target, and a new profile of a target replaces that target's rows in results/profile_<card>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backbones  # noqa: E402
from common import print_rows, synchronize, write_result  # noqa: E402
from scan import ours, route_index, scan_inputs  # noqa: E402


def _our_frame(frames: list[dict]) -> str:
    """The innermost frame in this project's code (the model or the kernels' host side), else the innermost one."""
    for f in frames:
        if any(part in f["filename"] for part in ("vision_mamba", "vim_kernels", "/kernels/")):
            return f"{Path(f['filename']).name}:{f['line']} {f['name']}"
    return f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def memory_at_peak(run) -> tuple[list[dict], dict]:
    """Replay one pass's allocator trace: the peak of allocated memory, and the tensors alive at that moment grouped
    by the line of our code that allocated them (what to free earlier or not to keep)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
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
    rows = [
        {"what": "alive_at_peak", "name": k, "mib": v / mib} for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])
    ]
    return rows, {"before_pass_mib": base / mib, "peak_mib": (base + peak) / mib}


def kernel_table(run, passes: int, device: torch.device) -> tuple[list[dict], float]:
    """GPU kernels (CPU operators on the CPU) of `passes` passes, per pass, largest first; and their total ms."""
    cuda = device.type == "cuda"
    for _ in range(3):
        run()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            run()
        synchronize(device)
    events = prof.key_averages()
    us = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in events if us(e) > 0]
    total = sum(us(e) for e in events)
    rows = [{"what": "kernel", "name": e.key[:120], "ms_per_pass": us(e) / 1e3 / passes, "share": us(e) / total,
             "calls_per_pass": e.count / passes} for e in events]  # fmt: skip
    return sorted(rows, key=lambda r: -r["ms_per_pass"]), total / 1e3 / passes


def model_pass(args, device):
    """One inference forward, or one training step (forward, cross-entropy, backward, AdamW), of the model."""
    what = "training step" if args.train else "inference"
    make = backbones.training_step if args.train else backbones.inference
    run = make(args.model, args.img_size, args.mode, args.batch, device, args)
    return run, f"{args.model} {args.img_size}px batch {args.batch} {args.mode} {what}"


def scan_pass(args, device):
    """The scan's forward and backward (gradients of every input) at one shape, over `--routes` routes."""
    batch, dim, length = (int(v) for v in args.scan.split(","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = {k: v.requires_grad_() for k, v in scan_inputs(args.routes, batch, dim, length, device, dtype).items()}
    fn = ours(
        args.scan_backend_kernels, args.routes, route_index(args.routes, length, device) if args.routes > 1 else None
    )
    grad = torch.randn_like(fn(**inputs))

    def run():
        torch.autograd.grad(fn(**inputs), list(inputs.values()), grad)

    return run, f"scan {batch},{dim},{length} routes {args.routes} {args.scan_backend_kernels} forward+backward"


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="vim_tiny", choices=list(backbones.MODELS))
    p.add_argument("--img-size", type=int, default=1248)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train", action="store_true", help="a training step instead of an inference forward")
    p.add_argument("--mode", default="eager", choices=list(backbones.MODES))
    p.add_argument("--scan", default=None, metavar="B,D,L", help="profile the scan alone at this shape")
    p.add_argument("--routes", type=int, default=1, choices=(1, 2, 4))
    p.add_argument("--scan-backend", default="auto", help="the Vim models' scan backend: auto | triton | torch")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--model-kwarg", dest="model_kwargs", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also the tensors alive at the peak of one pass (CUDA)")
    p.add_argument("--top", type=int, default=15, help="kernels printed")
    p.add_argument("--quick", action="store_true", help="a smoke run: 32 px, batch 2, depth 2, 1 pass")
    p.add_argument("--no-write", action="store_true", help="print only (e.g. under ncu)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    args.model_kwargs = backbones.parse_kwargs(args.model_kwargs)
    device = torch.device(args.device)
    if args.quick:
        args.img_size, args.batch, args.passes = 32, 2, 1
        args.model_kwargs.setdefault("depth", 2)
    args.scan_backend_kernels = (
        args.scan_backend if args.scan_backend != "auto" else ("triton" if device.type == "cuda" else "torch")
    )
    run, target = scan_pass(args, device) if args.scan else model_pass(args, device)
    rows, total_ms = kernel_table(run, args.passes, device)
    total = {
        "what": "total",
        "name": "GPU kernels" if device.type == "cuda" else "CPU operators",
        "ms_per_pass": total_ms,
    }
    print(f"{target}: {total_ms:.2f} ms of {total['name']} per pass")
    print_rows(rows[: args.top], ["ms_per_pass", "share", "calls_per_pass", "name"])
    if args.memory and device.type == "cuda":
        memory, peak = memory_at_peak(run)
        total.update(peak)
        print(
            f"memory: {peak['before_pass_mib']:.0f} MiB before the pass, peak {peak['peak_mib']:.0f} MiB; alive at the peak:"
        )
        print_rows(memory, ["mib", "name"])
        rows += memory
    rows = [{"target": target, **r} for r in [total, *rows]]
    if args.no_write:
        return None
    path = write_result("profile", rows, args.out, key=("target",), quick=args.quick)
    print(f"written {path}")
    return path


if __name__ == "__main__":
    main()
