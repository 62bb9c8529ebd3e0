"""Vim vs DeiT on one GPU: inference images/s, batch-1 latency and peak memory across resolutions, and
training images/s at 224 (forward + backward + AdamW step), all under bf16 autocast.

    python benchmarks/backbones.py                     # the full table (GPU), JSON to benchmarks/results/
    python benchmarks/backbones.py --quick --device cpu  # a smoke run at tiny sizes (what the tests run)

738 is not a multiple of 16: both families are measured at 736 (46x46 patches -- the token count the official
Vim code gets at 738, whose strided conv drops the last two pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_gib, time_ms, write_result  # noqa: E402

from vision_mamba.models import CudaGraphInference  # noqa: E402  (importing it registers the Vim variants)

RESOLUTIONS = (224, 512, 736, 1024, 1248)
INFER_MODELS = {
    "vim_tiny": ("vim_tiny_patch16_224", {}),
    "vim_small": ("vim_small_patch16_224", {}),
    "deit_tiny_fused": ("deit_tiny_patch16_224", {"fused_attn": True}),
    "deit_tiny_plain": ("deit_tiny_patch16_224", {"fused_attn": False}),
    "deit_small_fused": ("deit_small_patch16_224", {"fused_attn": True}),
    "deit_small_plain": ("deit_small_patch16_224", {"fused_attn": False}),
}
TRAIN_MODELS = {
    "vim_tiny": "vim_tiny_patch16_224",
    "vim_small": "vim_small_patch16_224",
    "vim_base": "vim_base_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}


# a Vim row measured with mamba_ssm's CUDA scan in place of ours (--mamba-build; benchmarks/mamba_ssm_cuda.py)
MAMBA = "+mamba_ssm_scan"


def scan_swap(key: str):
    if not key.endswith(MAMBA):
        return contextlib.nullcontext()
    import mamba_ssm_cuda

    return mamba_ssm_cuda.in_place_of_ours()


def build(name: str, img_size: int, device: torch.device, extra: dict, scan_backend: str) -> torch.nn.Module:
    kwargs = dict(img_size=img_size, num_classes=1000)
    if name.startswith("vim"):
        kwargs["scan_backend"] = scan_backend
    model = timm.create_model(name, **kwargs)
    if "fused_attn" in extra:
        for block in model.blocks:
            block.attn.fused_attn = extra["fused_attn"]
    return model.to(device)


def batch_for(img_size: int, quick: bool) -> int:
    if quick:
        return 2
    return 64 if img_size <= 736 else 16


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_inference(key: str, img_size: int, device, args) -> dict:
    name, extra = INFER_MODELS[key.removesuffix(MAMBA)]
    row = {"model": key, "timm_name": name, "img_size": img_size, "mode": "inference"}
    try:
        model = build(name, img_size, device, extra, args.scan_backend).eval()
        batch = batch_for(img_size, args.quick)
        x = torch.randn(batch, 3, img_size, img_size, device=device)
        x1 = x[:1].clone()

        def run(inp):
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
            ):
                return model(inp)

        with scan_swap(key):
            ms = time_ms(lambda: run(x), warmup=args.warmup, iters=args.iters)
            row.update(
                batch=batch,
                ms_per_batch=ms,
                images_per_s=batch * 1e3 / ms,
                latency_ms_batch1=time_ms(lambda: run(x1), warmup=args.warmup, iters=args.iters, latency=True),
                peak_mem_gib=peak_memory_gib(lambda: run(x)),
            )
    except torch.OutOfMemoryError:
        row.update(error="out of memory")
    finally:
        model = None
        free()
    return row


def graphed_latency(key: str, img_size: int, device, args) -> dict:
    """Batch-1 latency with the forward replayed from one CUDA graph (vision_mamba.models.CudaGraphInference):
    the host's launches out of the way, what a latency-bound deployment would run. Measured after every model's
    memory: a graph's private memory pool would otherwise count in the next model's peak."""
    name, extra = INFER_MODELS[key.removesuffix(MAMBA)]
    try:
        model = build(name, img_size, device, extra, args.scan_backend).eval()
        x1 = torch.randn(1, 3, img_size, img_size, device=device)
        with scan_swap(key):
            graphed = CudaGraphInference(model, x1)
            return {"latency_ms_batch1_graph": time_ms(lambda: graphed(x1), args.warmup, args.iters, latency=True)}
    except RuntimeError as e:  # a model that cannot be captured costs the column, not the run
        return {"graph_error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        model = graphed = None
        free()


def bench_training(key: str, device, args) -> dict:
    name = TRAIN_MODELS[key.removesuffix(MAMBA)]
    batch = 4 if args.quick else args.train_batch
    img = 32 if args.quick else 224
    row = {"model": key, "timm_name": name, "img_size": img, "batch": batch, "mode": "train"}
    try:
        model = build(name, img, device, {}, args.scan_backend).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        x = torch.randn(batch, 3, img, img, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with scan_swap(key):
            ms = time_ms(step, warmup=args.warmup, iters=args.iters)
            row.update(ms_per_step=ms, images_per_s=batch * 1e3 / ms, peak_mem_gib=peak_memory_gib(step))
    except torch.OutOfMemoryError:
        row.update(error="out of memory")
    finally:
        model = opt = None
        free()
    return row


def summary(rows: list[dict]) -> dict:
    """The claims of the issue at 1248: vim_tiny vs deit_tiny (plain and fused), and the crossover resolution."""
    by = {(r["model"], r["img_size"]): r for r in rows if r["mode"] == "inference" and "images_per_s" in r}
    out = {}
    top = max((r["img_size"] for r in rows if r["mode"] == "inference"), default=None)
    vim = by.get(("vim_tiny", top))
    for ref in ("deit_tiny_plain", "deit_tiny_fused"):
        other = by.get((ref, top))
        if vim and other:
            out[f"speedup_vs_{ref}_at_{top}"] = vim["images_per_s"] / other["images_per_s"]
            if vim.get("peak_mem_gib") and other.get("peak_mem_gib"):
                out[f"memory_saving_vs_{ref}_at_{top}"] = 1 - vim["peak_mem_gib"] / other["peak_mem_gib"]
    sizes = sorted({s for (_, s) in by})
    crossover = next(
        (
            s
            for s in sizes
            if ("vim_tiny", s) in by
            and ("deit_tiny_fused", s) in by
            and by[("vim_tiny", s)]["images_per_s"] > by[("deit_tiny_fused", s)]["images_per_s"]
        ),
        None,
    )
    out["crossover_vim_tiny_beats_fused_deit_tiny_at"] = crossover
    train = {r["model"]: r for r in rows if r["mode"] == "train" and "images_per_s" in r}
    for key in [k for k in train if k + MAMBA in train]:
        out[f"train_speedup_{key}_vs_mamba_ssm_scan"] = train[key]["images_per_s"] / train[key + MAMBA]["images_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a handful of iterations (smoke test)")
    p.add_argument("--resolutions", type=int, nargs="*", default=None)
    p.add_argument("--models", nargs="*", default=list(INFER_MODELS))
    p.add_argument("--train-models", nargs="*", default=list(TRAIN_MODELS))
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--scan-backend", default="auto")
    p.add_argument("--mamba-build", default=None, help="also time the Vim models on mamba_ssm's CUDA scan (built here)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    p.add_argument("--result-name", default="backbones", help="the JSON is <name>_<card>.json")
    args = p.parse_args()
    device = torch.device(args.device)
    resolutions = args.resolutions or ((32, 64) if args.quick else RESOLUTIONS)
    if args.mamba_build:
        import mamba_ssm_cuda

        if mamba_ssm_cuda.load(args.mamba_build) is None:
            raise SystemExit(
                f"no selective_scan_cuda build in {args.mamba_build}: run benchmarks/mamba_ssm_cuda.py first"
            )
        args.models += [k + MAMBA for k in args.models if k == "vim_tiny"]
        args.train_models += [k + MAMBA for k in args.train_models if k.startswith("vim")]

    rows = []
    for img_size in resolutions:
        for key in args.models:
            rows.append(bench_inference(key, img_size, device, args))
            print(rows[-1], flush=True)
    if device.type == "cuda":
        for row in [r for r in rows if "error" not in r]:
            row.update(graphed_latency(row["model"], row["img_size"], device, args))
    for key in args.train_models:
        rows.append(bench_training(key, device, args))
        print(rows[-1], flush=True)
    result = {"rows": rows, "summary": summary(rows), "quick": args.quick}
    path = write_result(args.result_name + ("_quick" if args.quick else ""), result, args.out)

    print(
        f"\nwritten {path}\n{'model':<18}{'mode':<10}{'size':>6}{'batch':>6}{'img/s':>10}{'lat1 ms':>9}{'graph':>7}{'GiB':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<18}{r['mode']:<10}{r['img_size']:>6}{r.get('batch', 0):>6}{r.get('images_per_s', float('nan')):>10.1f}"
            f"{r.get('latency_ms_batch1') or float('nan'):>9.2f}{r.get('latency_ms_batch1_graph') or float('nan'):>7.2f}"
            f"{r.get('peak_mem_gib') or float('nan'):>8.2f} {r.get('error', '')}{r.get('graph_error', '')}"
        )
    for k, v in result["summary"].items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
