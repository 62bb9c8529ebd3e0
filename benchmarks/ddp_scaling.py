"""DDP scaling from two training runs' CSV logs (ThroughputMonitor's samples/s): one GPU against N GPUs.

    python src/train.py ... callbacks=default_with_throughput trainer=gpu hydra.run.dir=RUN_1GPU
    python src/train.py ... callbacks=default_with_throughput trainer=ddp trainer.devices=N hydra.run.dir=RUN_NGPU
    python benchmarks/ddp_scaling.py RUN_1GPU RUN_NGPU --gpus N

(gpu_suite.sh's `ddp` step runs both on the embedded digits data where two or more GPUs are present.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_rows, write_result  # noqa: E402


def samples_per_sec(run: Path) -> float:
    """Median global samples/s over the second half of the run (after compilation and warm-up)."""
    logs = list(run.rglob("metrics.csv"))
    if not logs:
        raise SystemExit(f"no metrics.csv under {run}: train with logger=csv callbacks=default_with_throughput")
    log = pd.read_csv(logs[0])
    # Lightning logs the all-process rate only when the world size is > 1; alone, the device rate is the rate
    column = "train/samples_per_sec" if "train/samples_per_sec" in log else "train/device/samples_per_sec"
    rates = log[column].dropna().to_numpy()
    return float(pd.Series(rates[len(rates) // 2 :]).median())


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("single", help="the one-GPU run's folder")
    p.add_argument("multi", help="the N-GPU run's folder")
    p.add_argument("--gpus", type=int, default=2, help="N")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    one, many = samples_per_sec(Path(args.single)), samples_per_sec(Path(args.multi))
    rows = [
        {"gpus": 1, "images_per_s": one, "speedup": 1.0, "efficiency": 1.0, "run": str(args.single)},
        {"gpus": args.gpus, "images_per_s": many, "speedup": many / one, "efficiency": many / one / args.gpus,
         "run": str(args.multi)},
    ]  # fmt: skip
    path = write_result("ddp_scaling", rows, args.out)
    print_rows(rows, ["gpus", "images_per_s", "speedup", "efficiency"])
    print(f"written {path}")
    return path


if __name__ == "__main__":
    main()
