"""Bad input gets one short `error:` line naming the problem and the fix -- no traceback wall."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "extras.print_config=false",
        "~logger", "~callbacks.lr_monitor", "data.num_workers=0"]


def run(args: list[str], cwd: Path, script: str = "train.py", **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIM_ROOT": str(cwd), "HYDRA_FULL_ERROR": "0"}
    env.pop("VIM_RUN_ID", None)
    return subprocess.run([sys.executable, str(ROOT / "src" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240, **kwargs)


def assert_short_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and exactly one `error:` line holding every needle (and no traceback anywhere)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_data_root(tmp_path) -> None:
    assert_short_error(run(["data=imagenet", *FAST], tmp_path), "data.root", "layout")


def test_data_root_that_does_not_exist(tmp_path) -> None:
    assert_short_error(run(["data=imagenet", f"data.root={tmp_path}/nope", *FAST], tmp_path), "does not exist", "train/<class>")


def test_empty_class_folder(tmp_path) -> None:
    from test_train import write_tiny_imagenet

    root = write_tiny_imagenet(tmp_path / "imnet")
    (root / "train" / "n99999999").mkdir()
    proc = run(["data=imagenet", f"data.root={root}", "data.num_classes=4", *FAST], tmp_path)
    assert_short_error(proc, "n99999999", "holds no images")


@pytest.mark.parametrize("group", ["model", "data"])
def test_unknown_group_option_lists_the_choices(tmp_path, group: str) -> None:
    proc = run([f"{group}=no_such_thing"], tmp_path)
    assert_short_error(proc, f"Could not find '{group}/no_such_thing'", "Available options")


def test_image_size_not_divisible_by_patch(tmp_path) -> None:
    assert_short_error(run(["data.img_size=30", *FAST], tmp_path), "30", "patch")


def test_ckpt_path_that_does_not_exist(tmp_path) -> None:
    assert_short_error(run(["ckpt_path=/nowhere/x.ckpt", *FAST], tmp_path), "/nowhere/x.ckpt", "does not exist")


def test_eval_without_ckpt_path(tmp_path) -> None:
    assert_short_error(run([], tmp_path, "eval.py"), "ckpt_path is required")


# ---- the config, checked before anything is built ------------------------------------------------------------------


def test_config_mistakes_stop_train_py_before_any_data_is_written_or_read(tmp_path) -> None:
    """Each mistake named on one line, before the digits are written; and each run claims its own folder even when
    its name (by the time: here the year) is already taken."""
    by_year = "hydra.run.dir=${paths.log_dir}/runs/${now:%Y}"
    for _ in range(2):
        proc = run(["task.base_lr=-1", "model.scan=zigzag", by_year, *FAST], tmp_path)
        assert_one_error_line(proc, "2 problems in the config", "task.base_lr=-1 must be a number > 0",
                              "model.scan=zigzag is not a scan pattern: use one of bidirectional, cross")
    assert not (tmp_path / "data").exists(), "the data was touched before the config was checked"
    year = sorted(p.name for p in (tmp_path / "logs" / "runs").iterdir())
    assert len(year) == 2 and year[1] == year[0] + "_1", year


def test_config_mistakes_stop_eval_py_before_the_model_is_built(tmp_path) -> None:
    weights = tmp_path / "vim_t.pth"
    weights.write_bytes(b"")  # never read: the check comes first
    proc = run(["ckpt_path=null", f"model.pretrained={weights}", "model.scan_backend=cuda"], tmp_path, "eval.py")
    assert_one_error_line(proc, "model.scan_backend=cuda is not a scan backend: use one of auto, triton, torch, ref")


def test_runs_that_end_before_validation_finish_and_a_sweep_records_them_missing(tmp_path) -> None:
    """No epoch or one training step, with validation off or not reached yet: no traceback, exit 0, a warning, and
    the sweep's summary lists every job as NO_METRIC."""
    sweep = tmp_path / "sweep"
    proc = run(["-m", "trainer.max_epochs=0,1", "trainer.max_steps=1", "trainer.limit_val_batches=0,1.0",
                "trainer.limit_test_batches=1",
                "extras.print_config=false", "~logger", "~callbacks.lr_monitor", "data.num_workers=0",
                f"hydra.sweep.dir={sweep}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert output.count("optimized_metric=val/acc1_best was never logged") == 4, output[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["trainer.max_epochs"], r["trainer.limit_val_batches"], r["status"], r["value"]) for r in rows] == [
        ("0", "0", "NO_METRIC", ""), ("0", "1.0", "NO_METRIC", ""), ("1", "0", "NO_METRIC", ""),
        ("1", "1.0", "NO_METRIC", "")]
