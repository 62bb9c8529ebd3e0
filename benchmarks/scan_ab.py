"""A/B timing of two (or more) kernel trees on one GPU: each in its own process, rounds alternating, at Vim's shapes.

    python benchmarks/scan_ab.py --kernels base=/tmp/base_kernels --kernels new=kernels --rounds 3 --out DIR

Each --kernels NAME=DIR is a copy of `kernels/` (e.g. `git archive REV kernels | tar x -C /tmp/base`, then
--kernels base=/tmp/base/kernels): the child process imports it as `vim_kernels`. Per shape and chunk length T it
records the CUDA-event time, the GPU kernel time (profiler) and the host time of forward+backward (scan.py's
time_fwd_bwd), so a change is judged by the GPU time, which the host's speed does not move.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = [(128, 768, 197), (128, 384, 197)]
CHUNKS = ("auto", 8)  # the chunk length T of the saved states: "auto" (4 at these shapes) and Vim-S training's 8


def child(shapes: list[tuple[int, int, int]]) -> None:
    import scan  # noqa: E402  (imports vim_kernels from this process's PYTHONPATH)

    rows = []
    for batch, dim, L in shapes:
        f, fb, f_gpu, fb_gpu, fb_host = scan.time_fwd_bwd(scan.triton_scan, scan.scan_inputs(batch, dim, L), busy=True)
        rows.append({"shape": [batch, dim, L], "fwd_ms": f, "fwd_bwd_ms": fb, "fwd_gpu_ms": f_gpu,
                     "fwd_bwd_gpu_ms": fb_gpu, "fwd_bwd_host_ms": fb_host})  # fmt: skip
    print("ROWS " + json.dumps({"kernels": str(Path(scan.vk.__file__).parent), "rows": rows}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", action="append", default=[], metavar="NAME=DIR", help="a kernels/ tree to time")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES))
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    if args.child:
        child(shapes)
        return
    trees = {}
    for spec in args.kernels:
        name, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "triton_scan.py").is_file():
            sys.exit(f"--kernels takes NAME=DIR, DIR a copy of kernels/ (with triton_scan.py); got {spec!r}")
        trees[name] = Path(folder).resolve()
    if len(trees) < 2:
        sys.exit("give at least two --kernels NAME=DIR to compare")
    tmp = Path(tempfile.mkdtemp(prefix="scan_ab_"))
    runs = []
    for rnd in range(args.rounds):
        for name, folder in trees.items():
            (tmp / name).mkdir(exist_ok=True)
            link = tmp / name / "vim_kernels"
            if not link.exists():
                link.symlink_to(folder)
            for T in CHUNKS:
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / name), os.environ.get("PYTHONPATH", "")])}
                env.pop("VIM_SCAN_CONFIG", None)
                if T != "auto":
                    env["VIM_SCAN_CONFIG"] = json.dumps({"fwd": {"T": T}})
                cmd = [sys.executable, __file__, "--child", "--shapes", args.shapes]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((x for x in res.stdout.splitlines() if x.startswith("ROWS ")), None)
                if line is None:
                    sys.exit(f"{name} (T {T}) failed:\n{res.stderr[-2000:]}")
                got = json.loads(line[5:])
                for r in got["rows"]:
                    runs.append({"tree": name, "round": rnd, "T": T, **r})
                    print(f"{name:>8} T {T!s:>4} {str(tuple(r['shape'])):>16}: GPU {r['fwd_bwd_gpu_ms']:.3f} ms, "
                          f"events {r['fwd_bwd_ms']:.3f}, host {r['fwd_bwd_host_ms']:.3f}", flush=True)  # fmt: skip

    from common import write_result  # noqa: E402

    result = {"trees": {k: str(v) for k, v in trees.items()}, "runs": runs}
    path = write_result("scan_ab", result, Path(args.out) if args.out else None)
    print(f"\nresults: {path}\n{'tree':>8} {'T':>4} {'shape':>16} {'GPU ms (min..max over rounds)':>30}")
    for name in trees:
        for T in CHUNKS:
            for s in shapes:
                g = [r["fwd_bwd_gpu_ms"] for r in runs if r["tree"] == name and r["T"] == T and tuple(r["shape"]) == s]
                print(f"{name:>8} {T!s:>4} {str(s):>16} {min(g):14.3f} .. {max(g):.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
