"""Shared benchmark plumbing: timing, peak memory, where and on what code a figure was measured, and the one result
schema every script writes through `write_result`:

    {"benchmark": NAME, "environment": {card, torch, triton, cuda, python, commit, dirty, command, date, host CPU,
     ...}, "rows": [...], "summary": {...} (optional, derived from the rows)}

into `results/<benchmark>_<card>.json` (one current file per benchmark and card; history lives in git).

Where the tree is no git checkout (a copy on a GPU machine), the commit comes from a COMMIT file written beside the
code beforehand: `python benchmarks/common.py stamp` (or `ab.py extract` for another revision).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
STAMP = "COMMIT"
# what the code under measurement is made of: a change here makes a stamped tree dirty
SOURCE_DIRS = ("src", "kernels", "conf", "benchmarks", "tools")
SOURCE_SUFFIXES = (".py", ".yaml", ".sh", ".toml")
# environment fields that must agree for two runs' rows to share one file
SAME_CODE_AND_MACHINE = ("card", "torch", "triton", "cuda", "python", "commit", "dirty", "source_hash")


def card_tag(device_name: str | None = None) -> str:
    """The short card name in result file names: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA GeForce RTX 4090" ->
    "rtx4090"; "cpu" without CUDA."""
    if device_name is None:
        if not torch.cuda.is_available():
            return "cpu"
        device_name = torch.cuda.get_device_name(0)
    words = [w for w in device_name.lower().split() if w not in ("nvidia", "geforce", "tesla", "quadro")]
    if not words:
        return "gpu"
    tag = words[0].split("-")[0]
    if tag.isalpha() and len(words) > 1:  # "rtx 4090"
        tag += words[1].split("-")[0]
    return "".join(c for c in tag if c.isalnum()) or "gpu"


def source_hash(root: Path = ROOT) -> str:
    """SHA-256 over the source files of the tree (paths and contents, results excluded)."""
    h = hashlib.sha256()
    for folder in SOURCE_DIRS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root).as_posix()
            skip = "__pycache__" in rel or rel.startswith(
                ("benchmarks/results/", "conf/local/")
            )  # outputs, git-ignored
            if path.suffix in SOURCE_SUFFIXES and path.is_file() and not skip:
                h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def source_state(root: Path = ROOT) -> dict:
    """The tree's commit and whether its sources differ from it: from git where `root` is a checkout, else from
    the COMMIT file written by `stamp` (dirty when it says so or when the sources changed since). Unknown: None."""
    root = Path(root)
    digest = source_hash(root)
    if (root / ".git").exists():
        commit = _git(root, "rev-parse", "HEAD")
        changes = _git(root, "status", "--porcelain", "--", *SOURCE_DIRS, ":!benchmarks/results")
        if commit is not None:
            return {"commit": commit, "dirty": bool(changes), "source_hash": digest}
    stamp = root / STAMP
    if stamp.is_file():
        fields = dict(line.split(" ", 1) for line in stamp.read_text().splitlines()[1:] if " " in line)
        commit = stamp.read_text().split()[0]
        dirty = fields.get("dirty") == "true" or fields.get("source_hash") != digest
        return {"commit": commit, "dirty": dirty, "source_hash": digest}
    return {"commit": None, "dirty": None, "source_hash": digest}


def write_stamp(root: Path = ROOT, commit: str | None = None, dirty: bool | None = None) -> Path:
    """Write root/COMMIT: the commit, whether the tree differed from it, and the sources' hash, so that a copy of
    the tree without .git (a GPU machine's) still records what it measured."""
    root = Path(root)
    if commit is None:
        state = source_state(root)
        commit, dirty = state["commit"], state["dirty"]
    if commit is None:
        raise SystemExit(f"{root} is no git checkout: cannot tell its commit")
    path = root / STAMP
    path.write_text(f"{commit}\ndirty {'true' if dirty else 'false'}\nsource_hash {source_hash(root)}\n")
    return path


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Where and on what a result was measured: the card, the software, the code, the command line and the date."""
    import triton

    info = {
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        **source_state(),
        "command": " ".join(["python", *sys.argv]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host_cpu": host_cpu(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    for name in ("timm", "lightning"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def _row_key(row: dict, key: Sequence[str]) -> str:
    return json.dumps([row.get(k) for k in key])


def write_result(
    benchmark: str,
    rows: list[dict],
    out_dir: str | Path | None = None,
    key: Sequence[str] | None = None,
    summary: dict | None = None,
    quick: bool = False,
) -> Path:
    """Write `<benchmark>_<card>.json` in `out_dir` (default benchmarks/results; for a `quick` smoke run, a folder
    under the temp folder: smoke figures never land among the records).

    With `key` (row fields naming one measurement, e.g. model, img_size, mode), rows of an earlier file measured
    on the same card, software and code are kept unless re-measured, and its commands are listed in
    environment["runs"]: one file can gather several invocations. Otherwise the file is replaced."""
    out_dir = Path(out_dir or (Path(tempfile.gettempdir()) / "vim_benchmarks_quick" if quick else RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    path = out_dir / f"{benchmark}_{card_tag()}.json"
    runs = [{"command": env["command"], "date": env["date"]}]
    if key is not None and path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        old_env = old.get("environment") or {}
        if old.get("benchmark") == benchmark and all(old_env.get(k) == env[k] for k in SAME_CODE_AND_MACHINE):
            new_keys = {_row_key(r, key) for r in rows}
            rows = [r for r in old.get("rows", []) if _row_key(r, key) not in new_keys] + rows
            runs = (old_env.get("runs") or []) + runs
    env["runs"] = runs
    # one row a line: a new record's diff shows which figures changed
    parts = [f'"benchmark": {json.dumps(benchmark)}', f'"environment": {json.dumps(env, indent=1)}']
    parts.append('"rows": [\n' + ",\n".join(json.dumps(r, default=float) for r in rows) + "\n]")
    if summary is not None:
        parts.append(f'"summary": {json.dumps(summary, indent=1, default=float)}')
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    return path


def print_rows(rows: Iterable[dict], columns: Sequence[str]) -> None:
    """The rows as an aligned text table (floats to 3 significant figures; missing cells as "-")."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(t[i]) for t in table)]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20, latency: bool = False) -> float:
    """Milliseconds per call of ``fn``, the median of 3 rounds. On CUDA, CUDA events around `iters` back-to-back
    calls (the host queues ahead, so its launch overhead overlaps the GPU work, as in a model); with `latency`, or
    on the CPU, the median of single synchronised calls (host overhead included)."""
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
        return statistics.median(times)
    synchronize()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def first_call_s(fn: Callable[[], object]) -> float:
    """Seconds of one synchronised call: for a compiled function's first call, its compile time included."""
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def gpu_busy_ms(fn: Callable[[], object], iters: int = 20) -> float | None:
    """Milliseconds of GPU kernel time per call of ``fn`` (the profiler's CUDA kernel durations summed, after one
    warm-up call): the device's share alone, which `time_ms` hides where the host is the slower side. None without
    CUDA or where the profiler cannot attach."""
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    except RuntimeError as e:  # a profiler that cannot attach costs the column, not the run
        print(f"gpu_busy_ms: no GPU time ({e})", flush=True)
        return None
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3 / iters


def peak_memory_gib(fn: Callable[[], object]) -> float | None:
    """Peak allocated GPU memory (GiB) while running ``fn`` once, weights and inputs included; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


if __name__ == "__main__":
    if sys.argv[1:2] != ["stamp"]:
        raise SystemExit("usage: python benchmarks/common.py stamp   (writes COMMIT at the repository root)")
    print("written", write_stamp())
