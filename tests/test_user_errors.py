"""Bad input gets one short `error:` line naming the problem and the fix -- no traceback wall."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "extras.print_config=false",
        "~logger", "~callbacks.lr_monitor", "data.num_workers=0"]


def run(args: list[str], cwd: Path, script: str = "train.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "VIM_ROOT": str(cwd), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "src" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def assert_short_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


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
