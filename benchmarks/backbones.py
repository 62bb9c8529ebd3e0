"""The application benchmark: Vim and DeiT backbones on one GPU, eager and compiled side by side, under bf16 autocast.

    python benchmarks/backbones.py                                   # the full table (long: see gpu_suite.sh)
    python benchmarks/backbones.py --models vim_tiny vim_small --resolutions 224 --parts train lightning
    python benchmarks/backbones.py --device cpu --quick              # a smoke run at tiny sizes

One row per (model, resolution, mode), mode one of
  eager                  model(x) as written;
  compiled               torch.compile(model);
  compiled-cudagraphs    torch.compile(model, mode="reduce-overhead"): CUDA graphs, the shapes being fixed;
  compiled-max-autotune  torch.compile(model, mode="max-autotune-no-cudagraphs");
with the parts asked for (--parts):
  infer      images/s of the forward under torch.inference_mode, peak memory, first-call (compile) seconds;
  train      images/s of the training step (forward, cross-entropy, backward, AdamW), peak memory, first-step seconds;
  latency    milliseconds of one synchronised batch-1 forward (the host's share included);
  lightning  the training step as `src/train.py` runs it: the ClassificationTask built from the composed Hydra
             config (model=<vim model>, data=imagenet's recipe: Mixup/CutMix, label smoothing, EMA, metrics), with
             the config's seed, threads, callbacks (progress bar, checkpointing, non-finite check, LR monitor) and
             CSV logger, in the Trainer of trainer=gpu (bf16-mixed), fed synthetic batches already on the device;
             `compiled` is task.compile=true; other compiled modes have no such row.
Peak memory is the allocator's peak over one call, weights, optimiser state and inputs included. deit_tiny_fused
and deit_tiny_plain differ in their attention (scaled_dot_product_attention or the explicit softmax), the
comparison the Vim paper draws across resolutions. 738 px is no multiple of 16: use 736.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from lightning import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, first_call_s, peak_memory_gib, print_rows, synchronize, time_ms, write_result  # noqa: E402

import vision_mamba.models  # noqa: E402,F401  (registers the Vim variants with timm)

MODELS = {  # name in the rows: timm model, attributes set on its attention blocks
    "vim_tiny": ("vim_tiny_patch16_224", {}),
    "vim_small": ("vim_small_patch16_224", {}),
    "vim_base": ("vim_base_patch16_224", {}),
    "deit_tiny_fused": ("deit_tiny_patch16_224", {"fused_attn": True}),
    "deit_tiny_plain": ("deit_tiny_patch16_224", {"fused_attn": False}),
    "deit_small_fused": ("deit_small_patch16_224", {"fused_attn": True}),
}
DEFAULT_MODELS = ["vim_tiny", "vim_small", "deit_tiny_fused", "deit_tiny_plain"]
# the models with a conf/model/<name>.yaml, for the LightningModule's step
HYDRA_MODELS = {"vim_tiny": "vim_tiny", "vim_small": "vim_small", "vim_base": "vim_base"}
MODES = {
    "eager": None,
    "compiled": {},
    "compiled-cudagraphs": {"mode": "reduce-overhead"},
    "compiled-max-autotune": {"mode": "max-autotune-no-cudagraphs"},
}
RESOLUTIONS = (224, 512, 736, 1024, 1248)
PARTS = ("infer", "train", "latency", "lightning")


def batch_for(img_size: int) -> int:
    """The default batch: 128 at 224 (the training recipe's per-GPU batch), 32 up to 736, 16 above."""
    return 128 if img_size <= 224 else 32 if img_size <= 736 else 16


def build(key: str, img_size: int, device: torch.device, args) -> torch.nn.Module:
    name, attrs = MODELS[key]
    kwargs = dict(img_size=img_size, num_classes=1000, **args.model_kwargs)
    if name.startswith("vim"):
        kwargs["scan_backend"] = args.scan_backend
    model = timm.create_model(name, **kwargs)
    for block in getattr(model, "blocks", []):
        for attr, value in attrs.items():
            setattr(block.attn, attr, value)
    return model.to(device)


def compiled(model: torch.nn.Module, mode: str, args) -> Callable:
    if MODES[mode] is None:
        return model
    return torch.compile(model, backend=args.compile_backend, **MODES[mode])


def step_begin(mode: str) -> None:
    """CUDA-graph trees must be told where one iteration ends, or a replay would overwrite tensors still in use."""
    if mode == "compiled-cudagraphs":
        torch.compiler.cudagraph_mark_step_begin()


def free() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def timed(prefix: str, batch: int, fn: Callable[[], object], args) -> dict:
    """`fn`'s first call (compile time included), then its steady time, images/s and peak memory."""
    first = first_call_s(fn)
    ms = time_ms(fn, warmup=args.warmup, iters=args.iters)
    return {f"{prefix}_first_call_s": first, f"{prefix}_ms": ms, f"{prefix}_images_per_s": batch * 1e3 / ms,
            f"{prefix}_peak_mem_gib": peak_memory_gib(fn)}  # fmt: skip


def inference(key: str, img_size: int, mode: str, batch: int, device, args) -> Callable[[], torch.Tensor]:
    """One forward of a fresh model on a fixed batch, under torch.inference_mode and bf16 autocast."""
    model = build(key, img_size, device, args).eval()
    run_model = compiled(model, mode, args)
    x = torch.randn(batch, 3, img_size, img_size, device=device)

    def run():
        step_begin(mode)
        with torch.inference_mode(), autocast(device):
            return run_model(x)

    return run


def bench_inference(key: str, img_size: int, mode: str, batch: int, device, args) -> dict:
    return timed("infer", batch, inference(key, img_size, mode, batch, device, args), args)


def bench_latency(key: str, img_size: int, mode: str, device, args) -> dict:
    run = inference(key, img_size, mode, 1, device, args)
    run()  # compiles
    return {"latency_ms_batch1": time_ms(run, warmup=args.warmup, iters=args.iters, latency=True)}


def training_step(key: str, img_size: int, mode: str, batch: int, device, args) -> Callable[[], None]:
    """One training step of a fresh model on a fixed batch: forward and cross-entropy under bf16 autocast,
    backward, AdamW."""
    model = build(key, img_size, device, args).train()
    run_model = compiled(model, mode, args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        step_begin(mode)
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(run_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(key: str, img_size: int, mode: str, batch: int, device, args) -> dict:
    return timed("train", batch, training_step(key, img_size, mode, batch, device, args), args)


class StepTimer(Callback):
    """Times Lightning's training steps: the first (compile included), and steps warmup .. warmup + iters - 1 from
    the start of one to the start of the next (each with its optimiser step, EMA update and logging)."""

    def __init__(self, warmup: int, iters: int) -> None:
        self.warmup, self.iters = warmup, iters
        self.first_step_s = self.ms = self.peak_mem_gib = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        now = time.perf_counter()
        if batch_idx == 0:
            self._t_first = now
        elif batch_idx == 1:
            self.first_step_s = now - self._t_first
        if batch_idx == self.warmup:
            self._t0 = now
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        elif batch_idx == self.warmup + self.iters:
            self.ms = (now - self._t0) * 1e3 / self.iters
            if torch.cuda.is_available():
                self.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30


class SyntheticBatches(torch.utils.data.Dataset):
    """The same (images, labels) batch `length` times, already on the device (no host copy timed)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int) -> None:
        self.images, self.labels, self.length = images, labels, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.images, self.labels


def lightning_config(key: str, img_size: int, batch: int, mode: str, device, output_dir: str, args):
    """The training config as `python src/train.py model=<key> data=imagenet trainer=gpu task.compile=...` composes
    it, with its outputs (checkpoints, CSV logs) in `output_dir`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [
        f"model={HYDRA_MODELS[key]}", "data=imagenet", "data.root=unused", f"data.img_size={img_size}",
        f"data.batch_size={batch}", f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"task.compile={'true' if mode == 'compiled' else 'false'}", f"model.scan_backend={args.scan_backend}",
        f"paths.output_dir={output_dir}", *(f"++model.{k}={v}" for k, v in args.model_kwargs.items()),
        *args.hydra_overrides,
    ]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name="train.yaml", overrides=overrides)


def bench_lightning(key: str, img_size: int, mode: str, batch: int, device, args) -> dict:
    """train.py's fit on synthetic batches: its seed and threads, the task, callbacks, loggers and trainer of the
    composed config (no validation), timed by StepTimer."""
    import hydra
    from lightning import seed_everything

    from vision_mamba.utils import instantiate_callbacks, instantiate_loggers

    steps = args.warmup + args.iters + 1
    timer = StepTimer(args.warmup, args.iters)
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark  # process-wide: restored
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lightning_config(key, img_size, batch, mode, device, tmp, args)
        seed_everything(cfg.seed, workers=True, verbose=False)
        if cfg.extras.get("cpu_threads"):
            torch.set_num_threads(int(cfg.extras.cpu_threads))
        task = hydra.utils.instantiate(cfg.task, net=hydra.utils.instantiate(cfg.model))
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        labels = torch.randint(0, cfg.data.num_classes, (batch,), device=device)
        trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=[*instantiate_callbacks(cfg.get("callbacks")), timer],
            logger=instantiate_loggers(cfg.get("logger")), max_steps=steps, max_epochs=1, limit_val_batches=0,
            num_sanity_val_steps=0,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(SyntheticBatches(images, labels, steps), batch_size=None)
        try:
            trainer.fit(task, train_dataloaders=loader)
        finally:
            torch.set_num_threads(threads)
            torch.backends.cudnn.benchmark = cudnn_benchmark
    return {"lightning_first_step_s": timer.first_step_s, "lightning_ms": timer.ms,
            "lightning_images_per_s": batch * 1e3 / timer.ms, "lightning_peak_mem_gib": timer.peak_mem_gib}  # fmt: skip


def bench(key: str, img_size: int, mode: str, device, args) -> dict:
    batch = args.batch or batch_for(img_size)
    row = {"model": key, "timm_name": MODELS[key][0], "img_size": img_size, "mode": mode, "batch": batch}
    parts = {
        "infer": lambda: bench_inference(key, img_size, mode, batch, device, args),
        "train": lambda: bench_training(key, img_size, mode, batch, device, args),
        "latency": lambda: bench_latency(key, img_size, mode, device, args),
        "lightning": lambda: bench_lightning(key, img_size, mode, batch, device, args),
    }
    for part in args.parts:
        if part == "lightning" and (key not in HYDRA_MODELS or mode not in ("eager", "compiled")):
            continue
        try:
            row.update(parts[part]())
        except torch.OutOfMemoryError:
            row[f"{part}_error"] = "out of memory"
        except Exception as e:  # noqa: BLE001 - a part that fails (e.g. to compile) is recorded, the table goes on
            first_line = (str(e).strip().splitlines() or [""])[0]
            row[f"{part}_error"] = f"{type(e).__name__}: {first_line[:300]}"
        finally:
            free()
    return row


def parse_kwargs(items: list[str]) -> dict:
    """`depth=2` -> {"depth": 2}: keyword arguments for every timm.create_model call."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    p.add_argument("--modes", nargs="+", default=["eager", "compiled", "compiled-cudagraphs"], choices=list(MODES))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--batch", type=int, default=None, help="default: 128 at 224, 32 up to 736, 16 above")
    p.add_argument("--scan-backend", default="auto", help="the Vim models' scan backend: auto | triton | torch")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--model-kwarg", dest="model_kwargs", action="append", default=[], metavar="NAME=VALUE",
                   help="passed to every timm.create_model (e.g. depth=2)")  # fmt: skip
    p.add_argument("--hydra-override", dest="hydra_overrides", action="append", default=[],
                   help="extra override for the LightningModule's config (e.g. task.ema_decay=null)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="a smoke run: 32 px, batch 4, depth 2, 1 + 2 iterations")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    args.model_kwargs = parse_kwargs(args.model_kwargs)
    if args.quick:
        args.resolutions, args.batch, args.warmup, args.iters = [32], args.batch or 4, 1, 2
        args.model_kwargs.setdefault("depth", 2)
    device = torch.device(args.device)
    rows = []
    for img_size in args.resolutions:
        for key in args.models:
            for mode in args.modes:
                rows.append(bench(key, img_size, mode, device, args))
                print(rows[-1], flush=True)
    path = write_result("backbones", rows, args.out, key=("model", "img_size", "mode"), quick=args.quick)
    print(f"\nwritten {path}")
    print_rows(rows, ["model", "img_size", "mode", "batch", "infer_images_per_s", "infer_peak_mem_gib",
                      "infer_first_call_s", "train_images_per_s", "train_peak_mem_gib", "train_first_call_s",
                      "latency_ms_batch1", "lightning_images_per_s", "lightning_peak_mem_gib"])  # fmt: skip
    return path


if __name__ == "__main__":
    main()
