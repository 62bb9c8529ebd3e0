"""Two nodes on one machine: `torchrun --nnodes 2` (gloo, CPU) trains one run into one folder, as one process does."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "src" / "train.py")

# The digits at 16x16 with identity crops and no Mixup/EMA/drop-path: every process sees exactly the images one
# process would, so the runs differ by the order of float sums only. Global batch 32 = 2 nodes x 16.
FAST = [
    "trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=3",
    "trainer.log_every_n_steps=1", "trainer.deterministic=true", "data.num_workers=0", "data.persistent_workers=false",
    "data.img_size=16", "data.batch_size=32", "data.train_transform.scale=[1,1]", "data.train_transform.ratio=[1,1]",
    "model.scan_backend=torch", "extras.print_config=false", "test=false", "logger=csv", "callbacks.model_summary=null",
    "callbacks.rich_progress_bar=null", "~callbacks.lr_monitor",
]


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    e.pop("VIM_RUN_ID", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_val(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(next(run.glob("csv/version_*/metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


def weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


@pytest.mark.slow
def test_two_nodes_train_one_run_into_one_folder_like_one_process(tmp_path) -> None:
    data = tmp_path / "data"
    common = [f"paths.data_dir={data}", *FAST]
    # the one-process run first: it also writes the digits, which both nodes then only read
    one_process = subprocess.run([sys.executable, TRAIN, f"paths.log_dir={tmp_path / 'single'}", *common], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=300)
    assert one_process.returncode == 0, one_process.stderr[-3000:]

    port, nodes = free_port(), []
    for node_rank in (0, 1):
        # a static rendezvous with no --rdzv-id, as a multi-node launch is usually written
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}", TRAIN,
               "trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1", f"paths.log_dir={tmp_path / 'multi'}",
               *common]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(out[-3000:] for out in outputs)
    assert "MEMBER: 2/2" in outputs[1], "node 1 did not join a world of two"

    runs = list((tmp_path / "multi" / "train" / "runs").iterdir())
    assert len(runs) == 1, f"the two nodes must write one run folder, got {runs}"
    one, two = Path(next((tmp_path / "single" / "train" / "runs").iterdir())), runs[0]
    # measured: weights within 2.4e-7, val loss within 2e-7 (relative) of the one-process run
    single, multi = weights(one), weights(two)
    for name, tensor in single.items():
        torch.testing.assert_close(multi[name], tensor, rtol=0, atol=1e-6, msg=name)
    single_val, multi_val = last_val(one), last_val(two)
    assert multi_val["val/acc1"] == single_val["val/acc1"] and multi_val["val/acc5"] == single_val["val/acc5"]
    assert multi_val["val/loss"] == pytest.approx(single_val["val/loss"], rel=1e-6)
