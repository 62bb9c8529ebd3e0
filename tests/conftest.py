"""Shared fixtures: configs composed exactly as the entry points compose them, small and fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
# the entry points live in src/ beside the package: tests import them as `train` and `eval`
sys.path.insert(0, str(ROOT / "src"))

# one compute thread: faster for Vim's small elementwise ops on 2 cores (see conf/extras/default.yaml)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a config the way `python src/<entry>.py overrides...` does."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name=config_name, return_hydra_config=True, overrides=overrides or [])


def make_fast(cfg: DictConfig, tmp_path: Path, data_dir: Path) -> DictConfig:
    """Point outputs at tmp_path and shrink the run: CPU, no workers, no loggers, a few batches."""
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.log_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path)
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_train_batches = 2
        cfg.trainer.limit_val_batches = 2
        cfg.trainer.limit_test_batches = 2
        cfg.trainer.enable_model_summary = False
        cfg.data.num_workers = 0
        cfg.data.persistent_workers = False
        cfg.data.pin_memory = False
        cfg.extras.print_config = False
        cfg.logger = None
        cfg.callbacks.lr_monitor = None  # it refuses to run without a logger
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder for the session, so embedded datasets are written once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def cfg_train(tmp_path, data_dir) -> DictConfig:
    """The default training config (digits + vim_digits), shrunk to a smoke run."""
    cfg = make_fast(compose_config("train.yaml"), tmp_path, data_dir)
    yield cfg
    GlobalHydra.instance().clear()


@pytest.fixture
def cfg_eval(tmp_path, data_dir) -> DictConfig:
    cfg = make_fast(compose_config("eval.yaml", ["ckpt_path=."]), tmp_path, data_dir)
    yield cfg
    GlobalHydra.instance().clear()


def run_train(cfg: DictConfig) -> dict:
    """Run src/train.py's train() on a composed config, as `python src/train.py` would (HydraConfig set)."""
    from hydra.core.hydra_config import HydraConfig
    from train import train

    HydraConfig().set_config(cfg)
    metric_dict, _ = train(cfg)
    return metric_dict
