"""Resume keeps the run: the command line a resume composes (the run's recorded config first) and where it records."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vision_mamba.checkpointing import resume_argv, run_folder_of

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as Hydra records it: `python src/train.py data=imagenet data.num_classes=7 model=vim_small`."""
    run = tmp_path / "runs" / "2025-01-31_12-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    OmegaConf.save(OmegaConf.create(["data=imagenet", "data.num_classes=7", "model=vim_small", "+model.depth=2"]),
                   run / ".hydra" / "overrides.yaml")
    choices = {"data": "imagenet", "model": "vim_small", "task": "classification", "logger": "csv", "experiment": None,
               "local": "default", "hydra": "default", "hydra/launcher": "basic", "recipe": "imagenet"}
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), run / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create({"seed": 1}), run / ".hydra" / "config.yaml")
    return run


def test_resume_puts_the_run_config_first_and_the_new_overrides_last(run) -> None:
    argv = resume_argv(["train.py", f"hydra.run.dir={run}", "ckpt_path=last", "data.num_classes=9"], CONF, environ={})
    args = argv[1:]
    # choices still in conf/ (conf/local/default.yaml is machine-specific and absent), not overridden by the record
    assert args[:3] == ["task=classification", "logger=csv", "recipe=imagenet"]
    assert args[3:6] == ["data=imagenet", "model=vim_small", "+model.depth=2"], "recorded overrides, in order"
    assert "data.num_classes=7" not in args and args.index("data.num_classes=9") > 5, "an override given now wins"
    assert args[-1].startswith("hydra.output_subdir=.hydra/resume_"), "the original record is never overwritten"
    (run / args[-1].split("=", 1)[1]).mkdir()
    assert resume_argv(argv[:4], CONF, environ={})[-1] != args[-1], "a second resume records beside the first"


def test_a_checkpoint_inside_a_run_continues_that_run_in_its_folder(run, tmp_path) -> None:
    ckpt = run / "checkpoints" / "epoch_003.ckpt"
    assert run_folder_of(ckpt) == run and run_folder_of(tmp_path / "elsewhere.ckpt") is None
    args = resume_argv(["train.py", f"ckpt_path={ckpt}"], CONF, environ={})[1:]
    assert "data=imagenet" in args and f"hydra.run.dir={run}" in args
    args = resume_argv(["train.py", f"ckpt_path={ckpt}", "hydra.run.dir=/new"], CONF, environ={})[1:]
    assert "data=imagenet" in args and args[-1] == "hydra.run.dir=/new", "branching off into a new folder"


def test_other_ranks_record_nothing_and_fresh_runs_are_left_alone(run) -> None:
    # Lightning's DDP re-launch passes the run folder quoted; torchrun and srun set RANK / SLURM_PROCID
    relaunch = ["train.py", "ckpt_path=last", f'hydra.run.dir="{run}"']
    for environ in ({"LOCAL_RANK": "1"}, {"RANK": "3", "LOCAL_RANK": "0"}, {"SLURM_PROCID": "2"}):
        args = resume_argv(relaunch, CONF, environ=environ)[1:]
        assert "data=imagenet" in args and args[-1] == "hydra.output_subdir=null", environ
    assert resume_argv(["train.py", "data=imagenet"], CONF, environ={}) == ["train.py", "data=imagenet"]
    sweep = ["train.py", "-m", f"hydra.run.dir={run}", "ckpt_path=last", "task.base_lr=1e-3,2e-3"]
    assert resume_argv(sweep, CONF, environ={}) == sweep
