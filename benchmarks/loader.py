"""Images/s of the ImageNet recipe's training loader by worker count, to tell how many loader workers per GPU the
recipe needs: the real ImageFolderDataModule with conf/data/imagenet.yaml's settings (RandomResizedCrop, flip,
RandAugment rand-m9-mstd0.5-inc1, colour jitter, random erasing, bicubic, normalisation; pinned memory where CUDA
is), as `src/train.py data=imagenet` builds it, over JPEGs of ImageNet's usual size (500x375, about 100 kB) in
the ImageNet layout.

    python benchmarks/loader.py                  # workers 0, 1, 2, 4, 8, 16 up to the cores here
    python benchmarks/loader.py --workers 8 16 --batches 60
    python benchmarks/loader.py --quick          # a smoke run

One loader is one GPU's: its images/s at W workers against a model's training images/s (backbones.py) says how
many workers each GPU needs. `--distinct` JPEGs are written once and hard-linked under more names, so the files sit
in the page cache: decoding and augmentation are measured, not the disk. Each worker count's figure is the rate
over `--batches` batches after the first max(2, W) + 1, which include the workers' start.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning import seed_everything
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, print_rows, write_result  # noqa: E402

from vision_mamba.data.common import write_dataset_once  # noqa: E402

WORKERS = (0, 1, 2, 4, 8, 16)


def write_images(root: Path, classes: int, per_class: int, distinct: int, size: tuple[int, int]) -> Path:
    """ImageNet layout under root: train/<wnid>/*.JPEG (classes x per_class files) and val/<wnid>/ (2 each),
    hard links to `distinct` generated JPEGs: smooth colour fields with sensor-like noise, quality 90."""

    def write(folder: Path) -> str:
        rng = np.random.default_rng(0)
        sources = []
        for i in range(distinct):
            low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            pixels = np.asarray(low, dtype=np.float32) + rng.normal(0, 20, (size[1], size[0], 3))
            path = folder / f"source_{i}.JPEG"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            sources.append(path)
        n = 0
        for split, count in (("train", per_class), ("val", 2)):
            for c in range(classes):
                wnid = folder / split / f"n{c:08d}"
                wnid.mkdir(parents=True)
                for j in range(count):
                    os.link(sources[n % distinct], wnid / f"{wnid.name}_{j}.JPEG")
                    n += 1
        mean_kb = np.mean([p.stat().st_size for p in sources]) / 1e3
        for p in sources:
            p.unlink()
        return f"{distinct} distinct JPEGs of {size[0]}x{size[1]}, {mean_kb:.1f} kB on average"

    return write_dataset_once(root, write)


def datamodule(root: Path, classes: int, batch: int, workers: int, overrides: list[str]):
    """conf/data/imagenet.yaml, composed as the training entry point composes it, instantiated and set up."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train.yaml", overrides=[
            "data=imagenet", f"data.root={root}", f"data.num_classes={classes}", f"data.batch_size={batch}",
            f"data.num_workers={workers}", *overrides,
        ])  # fmt: skip
    # what train.py sets for its process: the seeds (workers' included) and the threads (the loader's, 0 workers)
    seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.extras.get("cpu_threads"):
        torch.set_num_threads(int(cfg.extras.cpu_threads))
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    return dm, cfg.data


def measure(dm, workers: int, batches: int) -> dict:
    skip = max(2, workers) + 1
    loader = dm.train_dataloader()
    if len(loader) < skip + batches:
        raise SystemExit(f"{len(loader)} batches per epoch; {skip + batches} needed: raise --per-class")
    t_start = time.perf_counter()
    it = iter(loader)
    next(it)
    first_s = time.perf_counter() - t_start
    for _ in range(skip - 1):
        next(it)
    t0 = time.perf_counter()
    images = 0
    for _ in range(batches):
        x, _ = next(it)
        images += x.shape[0]
    seconds = time.perf_counter() - t0
    del it, loader  # ends the (persistent) workers before the next count starts its own
    gc.collect()
    return {"first_batch_s": first_s, "images_per_s": images / seconds, "images": images}


def main(argv: list[str] | None = None) -> Path:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default: 0, 1, 2, 4, 8, 16 up to the cores")
    p.add_argument("--batch", type=int, default=128, help="one GPU's batch (the recipe: 1024 over 8 GPUs)")
    p.add_argument("--batches", type=int, default=30, help="batches timed per worker count")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=None, help="default: enough for the most workers' run")
    p.add_argument("--distinct", type=int, default=500, help="distinct JPEGs written")
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--data", default=None, help="folder for the images (default: one under the temp folder)")
    p.add_argument("--data-override", dest="overrides", action="append", default=[],
                   help="a Hydra override of the data config (e.g. data.train_transform.auto_augment=null)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smoke run: 64x48 px, batch 4, 0 and 1 workers")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.batch, args.batches, args.distinct, args.size = args.workers or [0, 1], 4, 2, 8, (64, 48)
        args.classes = 2
    workers = args.workers or [w for w in WORKERS if w <= cores]
    per_class = args.per_class or -(-(max(2, max(workers)) + 1 + args.batches) * args.batch // args.classes)
    name = f"imagenet_{args.classes}x{per_class}_{args.size[0]}x{args.size[1]}_{args.distinct}"
    root = Path(args.data or Path(tempfile.gettempdir()) / "vim_loader_benchmark") / name
    write_images(root, args.classes, per_class, args.distinct, tuple(args.size))
    images = (root / ".complete").read_text().strip()
    rows = []
    for w in workers:
        dm, data_cfg = datamodule(root, args.classes, args.batch, w, args.overrides)
        row = {"workers": w, "batch": args.batch, **measure(dm, w, args.batches)}
        row.update(pin_memory=bool(data_cfg.pin_memory and torch.cuda.is_available()), data=images,
                   data_overrides=args.overrides)  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    path = write_result("loader", rows, args.out, key=("workers", "batch", "data_overrides"), quick=args.quick)
    print(f"\nwritten {path} ({cores} cores)")
    print_rows(rows, ["workers", "batch", "images_per_s", "first_batch_s"])
    return path


if __name__ == "__main__":
    main()
