"""Predict on images: `python src/predict.py ckpt_path=PATH input=IMAGE|FOLDER|'GLOB' output=FOLDER`."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from eval import checkpoint_config
from vision_mamba.deploy import load_run
from vision_mamba.deploy.predicting import predict_files
from vision_mamba.utils import RankedLogger, UserError, extras
from vision_mamba.utils.utils import exit_on_user_error

log = RankedLogger(__name__, rank_zero_only=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is available: use device=cpu (or auto)")
    return device


def predict(cfg: DictConfig) -> list[Path]:
    """Load the run, predict every input image and write the task's output files; returns what was written."""
    device = pick_device(str(cfg.device))
    run = load_run(cfg)
    count, written = predict_files(run, hydra.utils.instantiate(cfg.data), cfg, device)
    log.info(f"Predicted {count} images ({run.kind}, {device}): " + ", ".join(str(p) for p in written))
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    checkpoint_config(cfg, "predict")
    extras(cfg)
    predict(cfg)


if __name__ == "__main__":
    main()
