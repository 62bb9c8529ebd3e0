"""Shared fixtures (the helpers themselves live in tests/helpers.py, importable from every test folder)."""

from __future__ import annotations

import os
from pathlib import Path

# one compute thread per test process (set before torch is imported, which reads it): pytest-xdist runs one process
# per core, and Vim's small elementwise ops run faster on one thread than on two contending ones
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at `import vim_kernels` (its Triton modules are
# imported statically), which test modules do at collection time: so it is set here, first. Without CUDA the Triton
# kernels then run interpreted on CPU tensors (tiny grids). VIM_KERNELS_POISON: every kernel output buffer starts as
# NaN, so an element a kernel fails to write fails the comparison.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VIM_KERNELS_POISON", "1")
from helpers import compose_config, make_fast
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig


def pytest_configure(config) -> None:
    # `make mutants`: mutmut forks each mutant's test run from a process that has imported torch, timm and the tests.
    # A garbage collection in the fork walks (and so copies) that whole inherited heap, about a second per mutant;
    # frozen objects are left out of every collection
    if os.environ.get("MUTANT_UNDER_TEST"):
        import gc

        gc.freeze()


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
