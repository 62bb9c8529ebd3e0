"""Training and evaluation end to end through src/train.py and src/eval.py on data in the ImageNet layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import as_job, compose_config, make_fast, run_train
from omegaconf import open_dict
from PIL import Image

from vision_mamba.checkpointing import load_checkpoint


def write_tiny_imagenet(root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class=(6, 3)) -> Path:
    """A tiny ImageNet: root/{train,val}/<wnid>/*.JPEG, each class a distinct colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for k, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = np.full((40, 48, 3), 60 * (k + 1), np.uint8) + rng.integers(0, 30, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def test_fit_and_test_on_digits_smoke(cfg_train) -> None:
    metrics = run_train(cfg_train)
    assert math.isfinite(float(metrics["train/loss_epoch"]))
    assert 0.0 <= float(metrics["test/acc1"]) <= 1.0
    ckpts = list(Path(cfg_train.paths.output_dir, "checkpoints").glob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts) and len(ckpts) >= 2
    assert not list(Path(cfg_train.paths.output_dir, "checkpoints").glob(".*tmp*")), "temporary checkpoint left"


def test_imagenet_layout_trains_with_the_real_recipe(tmp_path, data_dir) -> None:
    """`model=vim_tiny data=imagenet data.root=DIR`: the DeiT recipe (Mixup, RandAugment, EMA) on a tiny folder."""
    root = write_tiny_imagenet(tmp_path / "imagenet")
    cfg = compose_config("train.yaml", ["model=vim_digits", "data=imagenet", f"data.root={root}", "data.num_classes=3",
                                        "data.img_size=32", "data.batch_size=4", "model.scan_backend=torch"])
    cfg = make_fast(cfg, tmp_path, data_dir)
    metrics = run_train(cfg)
    assert "val/acc1_ema" in metrics and math.isfinite(float(metrics["train/loss_epoch"]))


@pytest.mark.slow
def assert_learns_on_digits(tmp_path, data_dir, overrides: list[str]) -> None:
    """Three full epochs of `python src/train.py` (+ overrides) on the digits: the epoch loss falls by 30% and the
    best val top-1 rises far above chance (10%)."""
    cfg = compose_config("train.yaml", ["logger=csv", *overrides])
    cfg = make_fast(cfg, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 3
        cfg.trainer.limit_train_batches = 1.0
        cfg.trainer.limit_val_batches = 1.0
        cfg.trainer.limit_test_batches = 1.0
        cfg.logger = compose_config("train.yaml", ["logger=csv"]).logger
        cfg.logger.csv.save_dir = str(tmp_path)
    metrics = run_train(cfg)
    log = pd.read_csv(next(Path(tmp_path).rglob("metrics.csv")))
    epoch_loss = log["train/loss_epoch"].dropna().to_numpy()
    assert epoch_loss[-1] < 0.7 * epoch_loss[0], f"training loss did not fall: {epoch_loss}"
    assert float(metrics["val/acc1_best"]) > 0.6, "val top-1 should be far above chance (0.1)"


def test_digits_learning_check_and_eval_reproduces_val_acc(tmp_path, data_dir) -> None:
    """A shorter version of `make train`: the loss falls and val top-1 rises far above chance (10%);
    then src/eval.py on the best checkpoint reports the top-1 that training logged for it."""
    assert_learns_on_digits(tmp_path, data_dir, [])

    best = next(Path(tmp_path, "checkpoints").glob("epoch_*.ckpt"))
    logged = load_checkpoint(best)["callbacks"]
    best_score = float(next(v["best_model_score"] for k, v in logged.items() if k.startswith("ModelCheckpoint")))

    from eval import evaluate

    ecfg = make_fast(compose_config("eval.yaml", [f"ckpt_path={best}"]), tmp_path / "eval", data_dir)
    with open_dict(ecfg):
        ecfg.trainer.limit_test_batches = 1.0
    emetrics, _ = evaluate(as_job(ecfg))
    assert float(emetrics["test/acc1"]) == pytest.approx(best_score, abs=1e-6)


def test_cross_scan_learning_check(tmp_path, data_dir) -> None:
    """The shorter learning check for `model.scan=cross` (four routes). (`python src/train.py model=vim_tiny
    model.scan=cross` reached 99.4% val top-1 on the digits.)"""
    assert_learns_on_digits(tmp_path, data_dir, ["model.scan=cross"])
