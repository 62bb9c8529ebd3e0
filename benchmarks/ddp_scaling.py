"""DDP scaling from two training runs' CSV logs (ThroughputMonitor's train/samples_per_sec): 1 GPU vs N GPUs.

    python benchmarks/ddp_scaling.py RUN_1GPU RUN_NGPU [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def samples_per_sec(run: Path) -> float:
    """Median global samples/s over the second half of the run (after compilation and warm-up)."""
    log = pd.read_csv(next(run.rglob("metrics.csv")))
    # Lightning logs the all-process rate only when the world size is > 1; alone, the device rate is the rate
    column = "train/samples_per_sec" if "train/samples_per_sec" in log else "train/device/samples_per_sec"
    rates = log[column].dropna().to_numpy()
    return float(pd.Series(rates[len(rates) // 2 :]).median())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("single")
    p.add_argument("multi")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    one, many = samples_per_sec(Path(args.single)), samples_per_sec(Path(args.multi))
    runs = [d for d in Path(args.multi).parent.iterdir() if d.is_dir()]
    result = {"single_gpu_images_per_s": one, "multi_gpu_images_per_s": many, "speedup": many / one,
              "output_dirs_under_parent": len(runs)}
    write_result("ddp_scaling", result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
