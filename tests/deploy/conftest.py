"""Trained runs shared by the deployment tests: one tiny checkpoint per task, trained once per test session (the
pytest-xdist workers share it through a file lock) in a run folder laid out as train.py lays it out."""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock
from helpers import as_job, compose_config, make_fast
from omegaconf import OmegaConf, open_dict

# the embedded defaults: train.yaml's digits + vim_digits, shapes_seg + vim_seg_shapes + UperNet, shapes_det +
# Mask R-CNN, and a two-block digits model with the four-route cross scan
RUNS = {
    "classification": [],
    "segmentation": ["experiment=shapes_seg"],
    "detection": ["experiment=shapes_det"],
    "cross": ["model.scan=cross", "+model.depth=2"],
}


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    """A folder of this test session seen by every xdist worker (the workers' own temp folders sit inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


def train_once(shared: Path, name: str) -> Path:
    """The run folder of RUNS[name] trained for two steps: checkpoints/last.ckpt and .hydra/config.yaml."""
    from train import train

    runs = shared / "deploy_runs"
    runs.mkdir(exist_ok=True)
    run = runs / name
    with FileLock(str(runs / f"{name}.lock")):
        if not (run / "checkpoints" / "last.ckpt").is_file():
            cfg = make_fast(compose_config("train.yaml", RUNS[name]), run, runs_data(shared))
            with open_dict(cfg):
                cfg.test = False
            job = as_job(cfg)
            train(job)
            # what Hydra records for a run launched from the command line
            (run / ".hydra").mkdir(exist_ok=True)
            OmegaConf.save(job, run / ".hydra" / "config.yaml")
            OmegaConf.save(OmegaConf.create(RUNS[name]), run / ".hydra" / "overrides.yaml")
    return run


def runs_data(shared: Path) -> Path:
    """paths.data_dir of the shared runs (their data.root is relative to it, as in any run's config)."""
    return shared / "deploy_runs" / "data"


@pytest.fixture(scope="session")
def trained(shared_dir):
    """trained(name) -> the run folder of RUNS[name]."""
    return lambda name: train_once(shared_dir, name)


@pytest.fixture
def entry_config(tmp_path, shared_dir):
    """entry_config("predict" | "export", overrides) -> the config `python src/<entry>.py overrides` runs with
    (paths.data_dir where the shared runs' data is), the checkpoint's run config adopted as the entry point adopts
    it."""
    from eval import adopt_run_config

    def compose(entry: str, overrides: list[str]):
        cfg = compose_config(f"{entry}.yaml", overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / entry)
            cfg.paths.data_dir = str(runs_data(shared_dir))
            cfg.extras.print_config = False
        job = as_job(cfg)
        if job.ckpt_path and job.use_run_config:
            adopt_run_config(job)
        return job

    return compose
