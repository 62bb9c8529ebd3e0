"""What the embedded defaults reach end to end: `src/train.py` as `make train` runs it (digits classification) and
the embedded segmentation and detection experiments, each in its own process with its committed settings; the
best validation metric, the test metric on the best checkpoint, epochs and wall-clock seconds on this machine.

    python benchmarks/embedded.py                          # make train, experiment=shapes_seg, experiment=shapes_det
    python benchmarks/embedded.py --runs digits_cross      # `model.scan=cross` on the digits (long on a CPU)
    python benchmarks/embedded.py --quick                  # a smoke run: one short epoch each

The runs write their data and logs under a temporary folder; the record is `embedded_<card>.json`.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, print_rows, write_result  # noqa: E402

# name -> (train.py overrides, the metric train.py optimises, the test metric reported beside it)
RUNS = {
    "digits": ([], "val/acc1_best", "test/acc1"),
    "digits_cross": (["model.scan=cross"], "val/acc1_best", "test/acc1"),
    "shapes_seg": (["experiment=shapes_seg"], "val/mIoU_best", "test/mIoU"),
    "shapes_det": (["experiment=shapes_det"], "val/bbox_mAP_best", "test/bbox_mAP_50"),
}
QUICK = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]


def last_values(run_dir: Path, val_metric: str) -> tuple[dict[str, float], int]:
    """The last logged value of every metric in the run's CSV log, and the number of epochs validated."""
    values: dict[str, float] = {}
    epochs = 0
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                logged = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
                values.update(logged)
                if val_metric in logged:
                    epochs = max(epochs, int(logged.get("epoch", 0)) + 1)
    return values, epochs


def train(name: str, work: Path, quick: bool) -> dict:
    overrides, best_metric, test_metric = RUNS[name]
    run_dir = work / name
    command = [
        sys.executable,
        "src/train.py",
        *overrides,
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={work / 'data'}",
        *(QUICK if quick else []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    values, epochs = last_values(run_dir, best_metric)
    return {
        "run": name,
        "overrides": " ".join(overrides) or "(make train)",
        "metric": best_metric,
        "value": values.get(best_metric),
        "test_metric": test_metric,
        "test_value": values.get(test_metric),
        "epochs": epochs,
        "wall_s": round(wall_s, 1),
        # the machine's load after the run: a shared machine's wall time is not an idle one's
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["digits", "shapes_seg", "shapes_det"])
    parser.add_argument("--quick", action="store_true", help="smoke run: one short epoch each")
    parser.add_argument("--out", default=None, help="folder for the record (default benchmarks/results)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vim_embedded_") as tmp:
        rows = []
        for name in args.runs:
            rows.append(train(name, Path(tmp), args.quick))
            print_rows(rows[-1:], ["run", "metric", "value", "test_metric", "test_value", "epochs", "wall_s"])
    path = write_result("embedded", rows, args.out, key=["run"], quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
