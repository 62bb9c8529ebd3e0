"""Test helpers shared by every test folder: configs composed exactly as the entry points compose them, shrunk."""

from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
# the entry points live in src/ beside the package: tests import them as `train` and `eval`
sys.path.insert(0, str(ROOT / "src"))

# one compute thread: faster for Vim's small elementwise ops on 2 cores (see conf/extras/default.yaml)
os.environ.setdefault("OMP_NUM_THREADS", "1")


class Exec:
    """Unpickling this runs Python code that creates ``marker`` (builtins.exec)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


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
        if cfg.get("callbacks"):
            cfg.callbacks.lr_monitor = None  # it refuses to run without a logger
    return cfg


def as_job(cfg: DictConfig) -> DictConfig:
    """What Hydra does before calling a task: register the `hydra` node globally and hand the task the rest."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    HydraConfig().set_config(cfg)
    job_cfg = cfg.copy()
    with open_dict(job_cfg):
        del job_cfg["hydra"]
    return job_cfg


def run_train(cfg: DictConfig) -> dict:
    """Run src/train.py's train() on a composed config, as `python src/train.py` would."""
    from train import train

    metric_dict, _ = train(as_job(cfg))
    return metric_dict
