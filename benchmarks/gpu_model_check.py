"""After a GPU training run: the loss was finite and fell, and the trained Vim's logits with the Triton scan match
the sequential reference scan in float32 for the same weights.

    python benchmarks/gpu_model_check.py RUN_DIR [--model vim_small_patch16_224] [--img-size 224]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import vision_mamba.models  # noqa: E402,F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--model", default="vim_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    run = Path(args.run_dir)

    log = pd.read_csv(next(run.rglob("metrics.csv")))
    steps = log.dropna(subset=["train/loss_step"])
    losses = steps["train/loss_step"].to_numpy()
    k = max(1, len(losses) // 10)
    first, last = float(losses[:k].mean()), float(losses[-k:].mean())
    val = log["val/acc1"].dropna().to_numpy() if "val/acc1" in log else []

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    torch.manual_seed(0)
    x = torch.randn(8, 3, args.img_size, args.img_size, device="cuda")
    logits = {}
    for backend in ("triton", "ref"):
        model = timm.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size, scan_backend=backend)
        model.load_state_dict(state)
        model = model.cuda().eval()
        with torch.no_grad():
            logits[backend] = model(x).float()
    rel = ((logits["triton"] - logits["ref"]).norm() / logits["ref"].norm()).item()
    result = {
        "run_dir": str(run), "model": args.model, "steps": int(len(losses)),
        "loss_first_10pct": first, "loss_last_10pct": last, "loss_finite": bool(all(math.isfinite(v) for v in losses)),
        "val_acc1_last": float(val[-1]) if len(val) else None, "logits_rel_err_triton_vs_ref_fp32": rel,
    }
    write_result("gpu_training_check", result, args.out)
    print(json.dumps(result, indent=2))
    ok = result["loss_finite"] and last < first and rel < 1e-3
    print("GPU TRAINING CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
