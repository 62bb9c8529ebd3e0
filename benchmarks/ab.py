"""A/B of two source trees on one card in one call: rounds alternate between the trees, each tree measured in a
process of its own that imports that tree's `vision_mamba` and `vim_kernels`.

    python benchmarks/ab.py extract cb61be8 ab/base      # the old tree: git archive + a COMMIT file
    python benchmarks/ab.py run ab/base . --rounds 3     # base against the working tree; results/ab_<card>.json
    python benchmarks/ab.py run ab/base . --quick --rounds 1  # a smoke run (on the CPU where there is no GPU)

Measured in each round: the scan at the table's shapes (benchmarks/scan.py's inputs, one route and both
directions, forward and forward+backward, CUDA events and GPU kernel time), vim_tiny inference at 1248 px batch 16,
and vim_small's training step at 224 px batch 128 (eager, bf16 autocast; images/s and peak memory). The child
process uses only what every tree has: timm.create_model after `import vision_mamba.models`, and
vim_kernels.selective_scan / multi_route_selective_scan. The record holds each tree's commit (from git, or the
COMMIT file `extract` or `common.py stamp` wrote), every round's figures and, per measure, both medians and the
new tree's slowdown (positive: slower or more memory).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ROOT, print_rows, source_state, write_result, write_stamp  # noqa: E402

MARK = "AB_MEASURES "


def extract(rev: str, dest: Path) -> None:
    """The tree of `rev` (this repository's) in `dest`, with a COMMIT file naming it."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True, check=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    print("written", write_stamp(dest, commit.stdout.strip(), dirty=False))


def child(parts: list[str], quick: bool) -> None:
    """Measure this process's tree and print the measures as one JSON line."""
    import scan  # torch and vim_kernels only: a scan-only child imports no model code
    import torch
    import vim_kernels

    import vision_mamba

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if device.type == "cuda" else "torch"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, iters = (1, 2) if quick else (3, 20)
    measures = []

    def add(name: str, value, lower_is_better: bool = True) -> None:
        if value is not None:
            measures.append({"measure": name, "value": value, "lower_is_better": lower_is_better})

    if "scan" in parts:
        for batch, dim, length in scan.QUICK_SHAPES if quick else scan.SHAPES:
            for routes in (1, 2):
                inputs = scan.scan_inputs(routes, batch, dim, length, device, dtype)
                ar = torch.arange(length, device=device)
                fn = scan.ours(backend, routes, torch.stack([ar, ar.flip(0)]) if routes == 2 else None)
                times = scan.time_fwd_bwd(fn, fn, inputs, warmup, iters)
                for key, value in times.items():
                    add(f"scan {batch},{dim},{length} routes {routes} {key}", value)
    if {"infer", "train"} & set(parts):
        import backbones
    args = argparse.Namespace(model_kwargs={"depth": 2} if quick else {}, scan_backend="auto", warmup=warmup,
                              iters=iters, compile_backend="inductor")  # fmt: skip
    if "infer" in parts:
        img, batch = (32, 2) if quick else (1248, 16)
        r = backbones.bench_inference("vim_tiny", img, "eager", batch, device, args)
        add(f"vim_tiny {img}px batch {batch} inference images/s", r["infer_images_per_s"], lower_is_better=False)
        add(f"vim_tiny {img}px batch {batch} inference peak GiB", r["infer_peak_mem_gib"])
        backbones.free()
    if "train" in parts:
        img, batch = (32, 2) if quick else (224, 128)
        r = backbones.bench_training("vim_small", img, "eager", batch, device, args)
        add(f"vim_small {img}px batch {batch} training images/s", r["train_images_per_s"], lower_is_better=False)
        add(f"vim_small {img}px batch {batch} training peak GiB", r["train_peak_mem_gib"])
    imported = {"vision_mamba": vision_mamba.__file__, "vim_kernels": vim_kernels.__file__}
    print(MARK + json.dumps({"imported": imported, "measures": measures}), flush=True)


def run_tree(name: str, tree: Path, link_dir: Path, args) -> dict:
    """One round of one tree: a child process with that tree's src/ and kernels/ (as vim_kernels) first on its path."""
    link = link_dir / name / "vim_kernels"
    if not link.exists():
        link.parent.mkdir(parents=True)
        link.symlink_to(tree / "kernels", target_is_directory=True)
    path = [str(tree / "src"), str(link.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "child",
        "--parts",
        *args.parts,
        *(["--quick"] if args.quick else []),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    line = next((x for x in res.stdout.splitlines() if x.startswith(MARK)), None)
    if line is None:
        raise SystemExit(f"tree {name} ({tree}) failed:\n{(res.stdout + res.stderr)[-3000:]}")
    got = json.loads(line[len(MARK) :])
    for module, file in got["imported"].items():
        if not Path(file).resolve().is_relative_to(tree):
            raise SystemExit(f"tree {name}: {module} came from {file}, not from {tree}")
    return got


def compare(rows: list[dict], names: list[str]) -> list[dict]:
    """Per measure: each tree's median over the rounds, and the second tree's slowdown against the first."""
    base, new = names
    out = []
    for measure in dict.fromkeys(r["measure"] for r in rows):
        mine = [r for r in rows if r["measure"] == measure]
        med = {n: statistics.median(r["value"] for r in mine if r["tree"] == n) for n in names}
        lower = mine[0]["lower_is_better"]
        ratio = med[new] / med[base] if lower else med[base] / med[new]
        out.append({"measure": measure, f"{base}_median": med[base], f"{new}_median": med[new], "slowdown": ratio - 1})
    return out


def run(args) -> Path:
    names = ["base", "new"]
    trees = {n: Path(d).resolve() for n, d in zip(names, (args.base, args.new))}
    for tree in trees.values():
        if not (tree / "src" / "vision_mamba").is_dir() or not (tree / "kernels").is_dir():
            raise SystemExit(f"{tree} is no source tree of this project (src/vision_mamba and kernels/ expected)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ab_") as tmp:
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]  # the first tree of a round alternates
            for name in order:
                got = run_tree(name, trees[name], Path(tmp), args)
                rows += [{"tree": name, "round": rnd, **m} for m in got["measures"]]
                print(f"round {rnd} {name}: " + ", ".join(f"{m['measure']} {m['value']:.4g}" for m in got["measures"]),
                      flush=True)  # fmt: skip
    medians = compare(rows, names)
    summary = {"trees": {n: {"dir": str(t), **source_state(t)} for n, t in trees.items()}, "medians": medians}
    path = write_result("ab", rows, args.out, summary=summary, quick=args.quick)
    for n in names:
        print(f"{n}: {trees[n]} at {summary['trees'][n]['commit']} (dirty: {summary['trees'][n]['dirty']})")
    print_rows(medians, ["measure", "base_median", "new_median", "slowdown"])
    print(f"written {path}")
    return path


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract", help="write the tree of a git revision into a folder, with its COMMIT file")
    e.add_argument("rev")
    e.add_argument("dest")
    r = sub.add_parser("run", help="measure two trees in alternating rounds")
    r.add_argument("base", help="the first tree (e.g. from `extract`)")
    r.add_argument("new", help="the second tree (e.g. .)")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    c = sub.add_parser("child")
    for q in (r, c):
        q.add_argument("--parts", nargs="+", default=["scan", "infer", "train"], choices=("scan", "infer", "train"))
        q.add_argument("--quick", action="store_true", help="tiny shapes and models (a smoke run)")
    args = p.parse_args(argv)
    if args.command == "extract":
        extract(args.rev, Path(args.dest))
        return None
    if args.command == "child":
        child(args.parts, args.quick)
        return None
    return run(args)


if __name__ == "__main__":
    main()
