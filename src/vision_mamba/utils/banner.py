"""run_banner: the first line of every run -- scan backend, precision and devices."""

from __future__ import annotations

import torch
from omegaconf import DictConfig


def describe_devices(trainer_cfg: DictConfig) -> str:
    accelerator = trainer_cfg.get("accelerator", "auto")
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    devices = trainer_cfg.get("devices", 1)
    nodes = trainer_cfg.get("num_nodes", 1)
    if accelerator == "gpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        count = torch.cuda.device_count() if devices in (-1, "auto") else devices
        where = f"{count}x {name}"
    else:
        where = f"{devices}x {accelerator}"
    strategy = trainer_cfg.get("strategy", None)
    return where + (f" x {nodes} nodes" if nodes and nodes > 1 else "") + (f" ({strategy})" if strategy else "")


def run_banner(cfg: DictConfig) -> str:
    """One line that says how this run computes, from the config (before anything is built): the scan backend is
    the one asked for, or for ``auto`` the one vim_kernels picks for the run's device."""
    import vim_kernels

    model_cfg = cfg.get("model") or {}
    requested = model_cfg.get("scan_backend", "auto")
    accelerator = cfg.trainer.get("accelerator", "auto")
    device = torch.device("cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu")
    backend = vim_kernels.best_backend(device) if requested == "auto" else requested
    return (
        f"vision-mamba | model {model_cfg.get('model_name', '?')} ({model_cfg.get('scan', 'bidirectional')} scan) | "
        f"scan backend {backend} (asked: {requested}) | precision {cfg.trainer.get('precision')} | "
        f"devices {describe_devices(cfg.trainer)}"
    )
