"""Selective-scan benchmark: Triton vs torch (and mamba_ssm's CUDA kernel, once built) at Vim shapes, against floors.

python benchmarks/scan.py            # benchmark, JSON to benchmarks/results/scan_<card>.json
python benchmarks/scan.py --mamba-build DIR  # with mamba_ssm's column (DIR from benchmarks/mamba_ssm_cuda.py)
python benchmarks/scan.py --check    # first the GPU kernel tests (pytest -m gpu tests/kernels), then the above
python benchmarks/scan.py --variants # also time the kernel variants (gradients checked first), use the fastest
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vim_kernels as vk  # noqa: E402
from common import gpu_busy_ms, host_ms, time_ms, write_result  # noqa: E402

SHAPES = [(128, 384, 197), (128, 768, 197), (128, 1536, 197), (16, 384, 6085), (8, 768, 6085)]
ROUTE_SHAPES = [(128, 384, 197), (16, 384, 785)]
N = 16
# mamba_ssm's selective_scan_fn on an H100 at (128, 768, 197), bf16, z + softplus (the issue's reference figures)
MAMBA_REF = {"shape": [128, 768, 197], "fwd_ms": 0.78, "bwd_ms": 2.38, "fwd_bwd_ms": 3.16}


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    x = torch.empty(2**28, device="cuda", dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), warmup=3, iters=20)
    return 2 * x.numel() * 4 / ms / 1e6


def exp_rate_tps() -> float:
    """exp2 throughput (exps/s) of a Triton kernel with many independent exp2 chains per thread."""
    import triton
    import triton.language as tl

    @triton.jit
    def _exp_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        acc = tl.zeros((BLOCK,), tl.float32)
        for _ in range(ITERS):
            x = tl.exp2(x) * -0.5  # stays in (-0.5, 0): no overflow, the exp cannot be hoisted
            acc += x
        tl.store(out_ptr + offs, acc)

    n, iters, block = 2**24, 256, 1024
    x = torch.rand(n, device="cuda") * -1
    out = torch.empty_like(x)
    ms = time_ms(lambda: _exp_kernel[(n // block,)](x, out, ITERS=iters, BLOCK=block), warmup=2, iters=10)
    return n * iters / ms * 1e3


def scan_inputs(batch, dim, L, dtype=torch.bfloat16, seed=0):
    """Channel-last bf16 activations, as the model's linear layers produce them; fp32 A, D, delta_bias."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def act(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    return dict(
        u=act(batch, L, dim).transpose(1, 2),
        delta=act(batch, L, dim, scale=0.5).transpose(1, 2),
        A=-torch.exp(torch.rand(dim, N, device="cuda", generator=g)),
        B=act(batch, L, N).transpose(1, 2),
        C=act(batch, L, N).transpose(1, 2),
        D=torch.randn(dim, device="cuda", generator=g),
        z=act(batch, L, dim).transpose(1, 2),
        delta_bias=torch.rand(dim, device="cuda", generator=g) - 1.0,
    )


def route_inputs(R, batch, dim, L, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def act(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    return dict(
        u=act(R, batch, L, dim),
        delta=act(R, batch, L, dim, scale=0.5),
        A=-torch.exp(torch.rand(R, dim, N, device="cuda", generator=g)),
        B=act(R, batch, L, N),
        C=act(R, batch, L, N),
        D=torch.randn(R, dim, device="cuda", generator=g),
        z=act(batch, L, dim),
        delta_bias=torch.rand(R, dim, device="cuda", generator=g) - 1.0,
    )


def time_fwd_bwd(fn, inputs, iters=20, busy=False):
    """(forward ms, forward+backward ms); the backward takes grads of every input via autograd.grad. With busy, the
    GPU kernel time of each (gpu_busy_ms) and the host time of forward+backward (host_ms) as well:
    (fwd, fwd+bwd, fwd busy, fwd+bwd busy, fwd+bwd host)."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    grad = torch.randn_like(out)
    args = list(leaves.values())

    def fwd():
        with torch.no_grad():
            fn(**inputs)

    def step():
        o = fn(**leaves)
        torch.autograd.grad(o, args, grad)

    times = (time_ms(fwd, iters=iters), time_ms(step, iters=iters))
    if not busy:
        return times
    try:
        return (*times, gpu_busy_ms(fwd, iters), gpu_busy_ms(step, iters), host_ms(step, iters))
    except RuntimeError as e:  # a profiler that cannot attach costs the column, not the run
        print(f"gpu_busy_ms failed ({e}); the GPU-time columns are NaN", flush=True)
        return (*times, float("nan"), float("nan"), host_ms(step, iters))


def floors(batch, dim, L, bw_gbs, exp_tps, elem_bytes=2):
    """Floors in ms: bytes/bandwidth (fwd: u, delta, z in + out; bwd adds dout in, du, ddelta, dz out) and
    exps/rate (one exp per (b, d, t, n) forward, recomputed once in the backward)."""
    e = batch * dim * L
    bc = 2 * batch * L * N * elem_bytes
    fwd_bytes = 4 * e * elem_bytes + bc
    bwd_bytes = 7 * e * elem_bytes + 2 * bc + 2 * batch * L * N * 4
    exps = e * N
    return {
        "fwd_bytes_ms": fwd_bytes / bw_gbs / 1e6,
        "fwd_exp_ms": exps / exp_tps * 1e3,
        "fwd_bwd_bytes_ms": (fwd_bytes + bwd_bytes) / bw_gbs / 1e6,
        "fwd_bwd_exp_ms": 2 * exps / exp_tps * 1e3,
    }


def triton_scan(**kw):
    return vk.selective_scan(**kw, delta_softplus=True, backend="triton")


def torch_scan(**kw):
    return vk.selective_scan(**kw, delta_softplus=True, backend="torch")


# kernel variants, tried in one call (--variants): name, full fwd config, full bwd config (T must agree)
def _seq(T, BD=32, w=1, **kw):
    return {"kind": "seq", "T": T, "BD": BD, "num_warps": w, **kw}


def _bseq(T, subs, BD=32, w=1, **kw):
    return {"kind": "seq", "T": T, "SUBS": subs, "BD": BD, "num_warps": w, **kw}


VARIANTS = [
    ("seq T4 D4 / seq T4 AHEAD1 maxnreg168", _seq(4, DEPTH=4), _bseq(4, 1, AHEAD=1, maxnreg=168)),  # T 4 default
    # AHEAD 1: the backward's rows of a sub-chunk loaded at its start; 3: and the next one's prefetched into L2
    ("seq T4 D4 / seq T4 AHEAD3 maxnreg168", _seq(4, DEPTH=4), _bseq(4, 1, AHEAD=3, maxnreg=168)),
    ("seq T4 D4 / seq T4 AHEAD1 maxnreg152", _seq(4, DEPTH=4), _bseq(4, 1, AHEAD=1, maxnreg=152)),
    ("seq T4 D4 / seq T4 maxnreg168", _seq(4, DEPTH=4), _bseq(4, 1, maxnreg=168)),  # rows loaded step by step
    # T 8 (Vim-S training): one sub-chunk per loop iteration (FLAT), capped, rows ahead
    ("seq T8 D4 / seq T8 SUBS2 FLAT AHEAD1 maxnreg168", _seq(8, DEPTH=4), _bseq(8, 2, FLAT=True, AHEAD=1, maxnreg=168)),
    ("seq T8 D4 / seq T8 SUBS2 FLAT AHEAD2 maxnreg168", _seq(8, DEPTH=4), _bseq(8, 2, FLAT=True, AHEAD=2, maxnreg=168)),
    ("seq T4 D4 / seq T4 AHEAD1 maxnreg168 (again)", _seq(4, DEPTH=4), _bseq(4, 1, AHEAD=1, maxnreg=168)),
]
# small-grid (long L) variants at (16, 384, 6085): 192 programs of 32 channels, so L is split into segments


def _split(seg, **kw):  # L split into segments of seg steps (two launches: _scan_fwd_split_kernel)
    return {**_seq(8, PREFETCH=16), "kind": "split", "SEG": seg, **kw}


def _small(seg, **bwd):  # a small-grid variant: split forward and backward in segments of seg steps, T 8
    tags = " ".join(k if v is True else f"{k}{v}" for k, v in bwd.items())
    return (f"small split SEG{seg} / seq SEG{seg} {tags}".rstrip(), _split(seg), _bseq(8, 2, SEG=seg, **bwd))


SMALL_VARIANTS = [
    _small(256, FLAT=True, AHEAD=1, maxnreg=168),  # the default
    _small(256, FLAT=True, AHEAD=2, maxnreg=168),
    _small(128, FLAT=True, AHEAD=1, maxnreg=168),
]


def grad_err(dtype=torch.bfloat16, L=197):
    """Max over inputs of the relative gradient error vs the fp32 reference at (2, 200, L)."""
    inputs = scan_inputs(2, 200, L, dtype=dtype, seed=L)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    ref_l = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    out = triton_scan(**leaves)
    ref = vk.selective_scan_ref(**ref_l, delta_softplus=True)
    go = torch.randn_like(ref)
    gs = torch.autograd.grad(out.float(), list(leaves.values()), go)
    rs = torch.autograd.grad(ref, list(ref_l.values()), go)
    errs = [((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-3)).item() for g, r in zip(gs, rs)]
    ok = all(torch.isfinite(g).all().item() for g in gs)
    return max(errs) if ok else float("nan")


def variants(log, which="all"):
    """Time each kernel variant (its gradients checked first against the reference) at (128, 768, 197) and at
    (16, 384, 6085); keep the fastest checked one of each as CONFIG / the small-grid settings."""
    from vim_kernels import triton_scan as ts

    rows = []

    def trial(name, fwd, bwd, inputs, iters):
        ts.CONFIG["fwd"], ts.CONFIG["bwd"] = dict(fwd), dict(bwd)
        row = {"name": name, "fwd": dict(fwd), "bwd": dict(bwd)}
        try:
            row["grad_err_bf16"] = max(grad_err(torch.bfloat16, 197), grad_err(torch.bfloat16, 13))
            row["grad_err_fp32"] = grad_err(torch.float32, 63)
            f, fb, f_busy, fb_busy, fb_host = time_fwd_bwd(triton_scan, inputs, iters=iters, busy=True)
            row.update(fwd_ms=f, fwd_bwd_ms=fb, bwd_ms=fb - f, fwd_busy_ms=f_busy, fwd_bwd_busy_ms=fb_busy)
            row["fwd_bwd_host_ms"] = fb_host
            row["ok"] = row["grad_err_bf16"] < 2e-2 and row["grad_err_fp32"] < 1e-3
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        log(f"variant {row}")
        return row

    def best(rs):  # by GPU time: the events also time the host, which varies from machine to machine
        ok = [r for r in rs if r.get("ok")]
        return min(ok, key=lambda r: r["fwd_bwd_busy_ms"]) if ok else None

    big = [trial(n, f, b, scan_inputs(128, 768, 197), 20) for n, f, b in VARIANTS] if which != "small" else []
    small = [trial(n, f, b, scan_inputs(16, 384, 6085), 5) for n, f, b in SMALL_VARIANTS] if which != "big" else []
    bb, bs = best(big), best(small)
    if bb is not None:
        ts.CONFIG["fwd"], ts.CONFIG["bwd"] = dict(bb["fwd"]), dict(bb["bwd"])
    if bs is not None:
        ts._FWD_SMALL_GRID = dict(bs["fwd"])
        ts._BWD_SMALL_GRID = {k: v for k, v in bs["bwd"].items() if k != "T"}  # the backward takes the forward's T
        ts.CONFIG["fwd"]["kind"] = ts.CONFIG["bwd"]["kind"] = "auto"
    log(f"chosen config {ts.CONFIG} small grid fwd {ts._FWD_SMALL_GRID} bwd {ts._BWD_SMALL_GRID}")
    return rows


def chosen_config() -> dict:
    """The scan settings in force, in VIM_SCAN_CONFIG's format (the suite hands --variants' choice to later steps)."""
    from vim_kernels import triton_scan as ts

    tables = {**ts.CONFIG, "fwd_small": ts._FWD_SMALL_GRID, "bwd_small": ts._BWD_SMALL_GRID}
    return {k: dict(v) for k, v in tables.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="run the GPU kernel tests first")
    ap.add_argument(
        "--variants", nargs="?", const="all", choices=("all", "big", "small"), help="time the kernel variants first"
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the torch backend timings")
    ap.add_argument("--mamba-build", default=None, help="folder of a built mamba_ssm selective_scan_cuda")
    ap.add_argument("--mamba-wait", type=float, default=0, help="seconds to wait for a build still running there")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    lines: list[str] = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    result: dict = {}
    if args.check:
        root = Path(__file__).resolve().parents[1]
        p = subprocess.run(
            # --noconftest: the GPU tests need none, and the project-wide conftest imports hydra
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider", "--noconftest"],
            cwd=root, capture_output=True, text=True,
        )  # fmt: skip
        tail = (p.stdout + p.stderr).strip().splitlines()[-25:]
        result["gpu_tests"] = {"returncode": p.returncode, "tail": tail}
        log("\n".join(tail))

    from vim_kernels import triton_scan as ts

    bw = copy_bandwidth_gbs()
    exp_tps = exp_rate_tps()
    log(f"copy bandwidth {bw:.0f} GB/s (read+write); exp2 rate {exp_tps / 1e12:.2f} T/s")
    result.update(copy_bandwidth_gbs=bw, exp2_per_s=exp_tps, mamba_ssm_reference_h100=MAMBA_REF, n_state=N)
    if args.variants:
        result["variants"] = variants(log, args.variants)
        result["small_grid"] = {"fwd": dict(ts._FWD_SMALL_GRID), "bwd": dict(ts._BWD_SMALL_GRID)}
        out_dir = Path(args.out) if args.out else Path(__file__).parent / "results"
        (out_dir / "scan_config.json").write_text(json.dumps(chosen_config()))
    result["config"] = {k: dict(v) for k, v in ts.CONFIG.items()}
    import mamba_ssm_cuda

    # loaded after the variants: a build started beside this run (the suite's `mamba` step) has time to finish
    selective_scan_fn = None
    if mamba_ssm_cuda.load(args.mamba_build, wait_s=args.mamba_wait):
        selective_scan_fn = mamba_ssm_cuda.selective_scan_fn
    result["mamba_ssm"] = (
        f"selective_scan_cuda built from the mamba_ssm sdist in {args.mamba_build} (benchmarks/mamba_ssm_cuda.py)"
        if selective_scan_fn
        else "not built (pass --mamba-build DIR, see benchmarks/mamba_ssm_cuda.py): mamba_ssm publishes sources only"
    )

    rows = []
    for batch, dim, L in SHAPES:
        inputs = scan_inputs(batch, dim, L)
        f, fb, f_busy, fb_busy, fb_host = time_fwd_bwd(triton_scan, inputs, busy=True)
        row = {
            "shape": [batch, dim, L],
            "triton_fwd_ms": f,
            "triton_fwd_bwd_ms": fb,
            "triton_fwd_busy_ms": f_busy,  # GPU kernel time alone (the host's launches can be the slower side)
            "triton_fwd_bwd_busy_ms": fb_busy,
            "triton_fwd_bwd_host_ms": fb_host,  # host time alone (Python, torch ops, launches)
            **floors(batch, dim, L, bw, exp_tps),
        }
        # the 3.16 ms-equivalent budget scales with the work (b*d*L) relative to (128, 768, 197)
        row["budget_ms"] = MAMBA_REF["fwd_bwd_ms"] * batch * dim * L / (128 * 768 * 197)
        row["fwd_bwd_vs_mamba_equiv"] = fb / row["budget_ms"]
        row["frac_floor_fwd"] = max(row["fwd_bytes_ms"], row["fwd_exp_ms"]) / f
        row["frac_floor_fwd_bwd"] = max(row["fwd_bwd_bytes_ms"], row["fwd_bwd_exp_ms"]) / fb
        if not args.no_torch and batch * dim * L <= 128 * 768 * 197:
            try:
                tf, tfb = time_fwd_bwd(torch_scan, inputs, iters=3)
                row.update(torch_fwd_ms=tf, torch_fwd_bwd_ms=tfb)
            except torch.OutOfMemoryError:
                row["torch"] = "out of memory"
            torch.cuda.empty_cache()
        if selective_scan_fn is not None:
            # its own layout, made outside the timing: (batch, dim, L) with L contiguous
            m_in = {k: v.contiguous() for k, v in inputs.items()}
            mf, mfb, mf_busy, mfb_busy, mfb_host = time_fwd_bwd(
                lambda **kw: selective_scan_fn(**kw, delta_softplus=True), m_in, busy=True
            )
            row.update(mamba_fwd_ms=mf, mamba_fwd_bwd_ms=mfb, fwd_vs_mamba=f / mf, fwd_bwd_vs_mamba=fb / mfb)
            row.update(mamba_fwd_busy_ms=mf_busy, mamba_fwd_bwd_busy_ms=mfb_busy, mamba_fwd_bwd_host_ms=mfb_host)
            del m_in
        rows.append(row)
        log(f"scan {row}")
        del inputs
        torch.cuda.empty_cache()
    result["scan"] = rows

    route_rows = []
    for (batch, dim, L), R in itertools.product(ROUTE_SHAPES, (2, 4)):
        inputs = route_inputs(R, batch, dim, L)
        if R == 2:
            ar = torch.arange(L, device="cuda")
            routes = torch.stack([ar, ar.flip(0)])
        else:
            routes = torch.stack([torch.randperm(L, device="cuda") for _ in range(R)])

        def fn(routes=routes, **kw):
            return vk.multi_route_selective_scan(**kw, routes=routes, delta_softplus=True, backend="triton")

        f, fb = time_fwd_bwd(fn, inputs)
        route_rows.append({"R": R, "shape": [batch, dim, L], "triton_fwd_ms": f, "triton_fwd_bwd_ms": fb,
                           "per_route_fwd_bwd_ms": fb / R})  # fmt: skip
        log(f"routes {route_rows[-1]}")
    result["multi_route"] = route_rows

    path = write_result("scan", result, Path(args.out) if args.out else None)
    # the short table, last
    print(f"\nresults: {path}")
    print(f"{'shape (b,d,L)':>18} {'fwd ms':>8} {'f+b ms':>8} {'f+b GPU':>8} {'f+b host':>8} {'budget':>7} {'floor f+b':>9}"
          f" {'torch f+b':>9} {'mamba f':>8} {'mamba f+b':>9} {'mamba GPU':>9}")  # fmt: skip
    for r in rows:
        floor_fb = max(r["fwd_bwd_bytes_ms"], r["fwd_bwd_exp_ms"])
        tfb = f"{r['torch_fwd_bwd_ms']:.2f}" if "torch_fwd_bwd_ms" in r else "-"
        mf = f"{r['mamba_fwd_ms']:.3f}" if "mamba_fwd_ms" in r else "-"
        mfb = f"{r['mamba_fwd_bwd_ms']:.3f}" if "mamba_fwd_bwd_ms" in r else "-"
        mgpu = f"{r['mamba_fwd_bwd_busy_ms']:.3f}" if "mamba_fwd_bwd_busy_ms" in r else "-"
        print(f"{str(tuple(r['shape'])):>18} {r['triton_fwd_ms']:8.3f} {r['triton_fwd_bwd_ms']:8.3f} "
              f"{r['triton_fwd_bwd_busy_ms']:8.3f} {r['triton_fwd_bwd_host_ms']:8.3f} {r['budget_ms']:7.2f} {floor_fb:9.3f} {tfb:>9} {mf:>8} {mfb:>9}"
              f" {mgpu:>9}")  # fmt: skip
    for r in route_rows:
        print(f"R={r['R']} {str(tuple(r['shape'])):>14} {r['triton_fwd_ms']:8.3f} {r['triton_fwd_bwd_ms']:8.3f}")


if __name__ == "__main__":
    main()
