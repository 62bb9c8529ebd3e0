"""Shared fixtures (the helpers themselves live in tests/helpers.py, importable from every test folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One compute thread per test process (tests/helpers.py says why). torch reads OMP_NUM_THREADS when it is imported,
# which happens above, before helpers sets it: with two threads per xdist worker on two cores, a small Vim trains
# ten times slower on a busy machine.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))

# Triton reads TRITON_INTERPRET when a kernel is first decorated; other test folders import the model (and so the
# kernels) at collection time, before tests/kernels/conftest.py runs, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from helpers import compose_config, make_fast
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig


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
