"""Shared benchmark plumbing: CUDA-event timing, peak memory, and the JSON record (card, versions, command, date)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Where a result was measured: the card, the software versions, the command line and the date."""
    import triton  # noqa: F401  (version recorded below)

    info = {
        "card": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    for name in ("triton", "timm", "lightning"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def gpu_busy_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """Milliseconds of GPU kernel time per call of ``fn`` (CUDA kernels' durations summed by the profiler, after one
    warm-up call): the device's share alone, which `time_ms` hides where the host is the slower side."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3 / iters


def host_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """Milliseconds of host time per call of ``fn``: `iters` calls queued without waiting on the GPU (its Python,
    the torch dispatch and the kernel launches). Beside `gpu_busy_ms` it says which side bounds a call."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e3


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20, latency: bool = False) -> float:
    """Milliseconds per call of ``fn``: on GPU, CUDA events around `iters` back-to-back calls (the host queues
    ahead, so its launch overhead overlaps the GPU work, as in a model), median of 3 such rounds; with
    `latency`, the median of single synchronised calls (host overhead included); on CPU, the median of `iters`
    perf_counter timings."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available() and not latency:
        torch.cuda.synchronize()
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / iters)
    else:
        import time

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_gib(fn: Callable[[], object]) -> float | None:
    """Peak allocated GPU memory (GiB) while running ``fn`` once, weights and inputs included."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``<name>_<card>.json`` with the environment record merged in."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    card = env["card"].replace("NVIDIA ", "").split(" ")[0].lower() if torch.cuda.is_available() else "cpu"
    path = out_dir / f"{name}_{card}.json"
    path.write_text(json.dumps({"environment": env, **payload}, indent=2))
    return path
