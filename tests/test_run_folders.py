"""Run folders: writable before anything runs, one per launch even within a second, shared by a launch's processes,
and made with the user's umask."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from datetime import timedelta

import pytest
from helpers import ROOT, compose_config
from omegaconf import OmegaConf, open_dict, read_write

from vision_mamba.utils.hydra_callbacks import RunFolder, pin_run_id_from_launcher

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def without_root_file_access() -> None:
    """In the child, before exec: drop the capabilities that let root write anywhere, so permissions apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_output_folder_is_one_line_before_anything_runs(tmp_path) -> None:
    read_only = tmp_path / "logs"
    read_only.mkdir()
    read_only.chmod(0o555)
    env = {**os.environ, "VIM_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "0"}
    env.pop("VIM_RUN_ID", None)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), f"paths.log_dir={read_only}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
                              preexec_fn=without_root_file_access if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as e:  # a container that may not drop capabilities
        pytest.skip(f"cannot run a process without root's file access here: {e}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: the output folder {read_only}/train/runs/")
    assert f"cannot be written ({read_only} is not writable): set paths.log_dir=" in errors[0]
    assert not (tmp_path / "data").exists()


def hydra_config(**changes: str):
    """train.yaml as Hydra hands it to its callbacks, with hydra.* keys changed (unresolved)."""
    cfg = compose_config("train.yaml")
    with read_write(cfg), open_dict(cfg):
        for key, value in changes.items():
            OmegaConf.update(cfg, f"hydra.{key}", value, merge=False)
    return cfg


def test_runs_named_by_the_same_time_get_their_own_folders(tmp_path, monkeypatch) -> None:
    """Folders are named by the launch time to the second; here by the year, so that three runs share the name."""
    monkeypatch.delenv("VIM_RUN_ID", raising=False)
    folders = []
    for _ in range(3):
        cfg = hydra_config(**{"run.dir": f"{tmp_path}/runs/${{now:%Y}}"})
        RunFolder().on_run_start(cfg)
        folders.append(cfg.hydra.run.dir)
    base = folders[0]
    assert folders == [base, base + "_1", base + "_2"] and all(os.path.isdir(f) for f in folders)

    # a sweep: its folder is claimed too, and its jobs (which re-compose their config) are told where it is
    cfg = hydra_config(**{"sweep.dir": f"{tmp_path}/sweeps/${{now:%Y}}"})
    RunFolder().on_multirun_start(cfg)
    RunFolder().on_multirun_start(again := hydra_config(**{"sweep.dir": f"{tmp_path}/sweeps/${{now:%Y}}"}))
    assert again.hydra.sweep.dir == cfg.hydra.sweep.dir + "_1"
    assert f"hydra.sweep.dir='{again.hydra.sweep.dir}'" in again.hydra.overrides.hydra


def test_a_launch_that_names_its_folder_keeps_it(tmp_path, monkeypatch) -> None:
    """All processes of a torchrun/SLURM launch (VIM_RUN_ID), a resume or a DDP child (hydra.run.dir given) share
    their folder: nothing is claimed for them."""
    monkeypatch.setenv("VIM_RUN_ID", "launch_7")
    for _ in range(2):
        cfg = hydra_config(**{"run.dir": f"{tmp_path}/runs/${{oc.env:VIM_RUN_ID,'${{now:%Y}}'}}"})
        RunFolder().on_run_start(cfg)
        assert cfg.hydra.run.dir == f"{tmp_path}/runs/launch_7"
    monkeypatch.delenv("VIM_RUN_ID")
    (tmp_path / "old_run").mkdir()
    cfg = hydra_config(**{"run.dir": str(tmp_path / "old_run")})
    RunFolder().on_run_start(cfg)
    assert cfg.hydra.run.dir == str(tmp_path / "old_run")


def test_torchrun_processes_without_a_job_id_agree_through_the_agents_store() -> None:
    """`torchrun --master-addr/--master-port` (no --rdzv-id): every process reads the id the first one proposed."""
    from torch.distributed import TCPStore

    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    launch = {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port)}
    ranks = [dict(launch, RANK=str(r)) for r in range(2)]
    ids = [pin_run_id_from_launcher(environ) for environ in ranks]
    assert ids[0] == ids[1] == ranks[1]["VIM_RUN_ID"] and len(ids[0]) == len("2025-01-31_12-00-00_abcdef")
    # a launch with a job id uses it, and a single process is left alone
    assert pin_run_id_from_launcher({**launch, "TORCHELASTIC_RUN_ID": "job42"}) == "torchrun_job42"
    assert pin_run_id_from_launcher({**launch, "WORLD_SIZE": "1"}) is None


def test_generated_datasets_honour_the_umask(tmp_path) -> None:
    from vision_mamba.data.common import write_dataset_once

    def write(folder):
        (folder / "train").mkdir()
        (folder / "train" / "a.png").write_bytes(b"")
        return "one image"

    old = os.umask(0o027)
    try:
        root = write_dataset_once(tmp_path / "shapes", write)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (root, root / "train", root / "train" / "a.png")}
    assert modes == {"shapes": 0o750, "train": 0o750, "a.png": 0o640}
