"""Training and evaluation end to end through src/train.py and src/eval.py on data in the ImageNet layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import as_job, compose_config, make_fast, run_train
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from vision_mamba.checkpointing import load_checkpoint


def write_tiny_imagenet(root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class=(6, 3)) -> Path:
    """A tiny ImageNet: root/{train,val}/<wnid>/*.JPEG. Class k is red, green or blue (channel k bright, the others
    dark, each pixel noisy): the dominant channel survives the recipe's crops, RandAugment and colour jitter."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for k, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(20, 70, (40, 48, 3))
                img[..., k] += rng.integers(120, 180)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def test_fit_and_test_on_digits_smoke(cfg_train) -> None:
    metrics = run_train(cfg_train)
    assert math.isfinite(float(metrics["train/loss_epoch"]))
    assert 0.0 <= float(metrics["test/acc1"]) <= 1.0
    ckpts = list(Path(cfg_train.paths.output_dir, "checkpoints").glob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts) and len(ckpts) >= 2
    assert not list(Path(cfg_train.paths.output_dir, "checkpoints").glob(".*tmp*")), "temporary checkpoint left"


@pytest.mark.slow
def test_imagenet_layout_learns_with_the_real_recipe(tmp_path, data_dir) -> None:
    """`data=imagenet data.root=DIR`: the DeiT recipe (RandAugment, colour jitter, random erasing, Mixup/CutMix, label
    smoothing, EMA, warm-up + cosine) learns on a tiny folder of red, green and blue images. Only the scale changes:
    6 epochs, 1 of warm-up, lr 1e-3 (the linear rule would give 5e-4 x 8 / 512). The validation loss (no
    augmentation) falls steadily; the Mixup training loss is noisy, so only its best late epoch is compared."""
    root = write_tiny_imagenet(tmp_path / "imagenet", per_class=(12, 4))
    cfg = compose_config("train.yaml", ["model=vim_digits", "data=imagenet", f"data.root={root}", "data.num_classes=3",
                                        "data.img_size=32", "data.batch_size=8", "model.scan_backend=torch",
                                        "task.base_lr=1e-3", "task.base_batch_size=8", "task.schedule.warmup_epochs=1",
                                        "logger=csv"])
    cfg = make_fast(cfg, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 6
        cfg.trainer.limit_train_batches = 1.0
        cfg.trainer.limit_val_batches = 1.0
        cfg.logger = compose_config("train.yaml", ["logger=csv"]).logger
        cfg.logger.csv.save_dir = str(tmp_path)
    assert cfg.task.mixup.mixup_alpha > 0 and cfg.task.ema_decay and cfg.data.train_transform.auto_augment
    metrics = run_train(cfg)
    log = pd.read_csv(next(Path(tmp_path).rglob("metrics.csv")))
    train_loss, val_loss = log["train/loss_epoch"].dropna().to_numpy(), log["val/loss"].dropna().to_numpy()
    # measured (seeds 12345, 1): val loss 0.79 -> 0.42 and 0.87 -> 0.51; best late train loss 0.84 and 0.79 of the first
    assert len(val_loss) == 6 and val_loss[-1] < 0.7 * val_loss[0], f"validation loss did not fall: {val_loss}"
    assert min(train_loss[-3:]) < 0.9 * train_loss[0], f"training loss did not fall: {train_loss}"
    assert float(metrics["val/acc1_best"]) >= 0.9, "val top-1 should be far above chance (1/3)"
    assert "val/acc1_ema" in metrics


def assert_learns_on_digits(tmp_path, data_dir, overrides: list[str]) -> DictConfig:
    """Three full epochs of `python src/train.py` (+ overrides) on the digits: the epoch loss falls by 30% and the
    best val top-1 rises far above chance (10%). Returns the run's config."""
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
    return cfg


def best_checkpoint_and_score(run_dir: Path) -> tuple[Path, float]:
    """The top-1 checkpoint of a run and the val top-1 ModelCheckpoint recorded for it."""
    best = next(Path(run_dir, "checkpoints").glob("epoch_*.ckpt"))
    logged = load_checkpoint(best)["callbacks"]
    return best, float(next(v["best_model_score"] for k, v in logged.items() if k.startswith("ModelCheckpoint")))


@pytest.mark.slow
def test_digits_learning_check_and_eval_reproduces_val_acc(tmp_path, data_dir) -> None:
    """A shorter version of `make train`: the loss falls and val top-1 rises far above chance (10%);
    then src/eval.py on the best checkpoint reports the top-1 that training logged for it."""
    assert_learns_on_digits(tmp_path, data_dir, [])
    best, best_score = best_checkpoint_and_score(tmp_path)

    from eval import evaluate

    ecfg = make_fast(compose_config("eval.yaml", [f"ckpt_path={best}"]), tmp_path / "eval", data_dir)
    with open_dict(ecfg):
        ecfg.trainer.limit_test_batches = 1.0
    emetrics, _ = evaluate(as_job(ecfg))
    assert float(emetrics["test/acc1"]) == pytest.approx(best_score, abs=1e-6)


@pytest.mark.slow
def test_cross_scan_learning_check_and_eval_adopts_the_run_config(tmp_path, data_dir) -> None:
    """The shorter learning check for `model.scan=cross` (four routes). (`python src/train.py model=vim_tiny
    model.scan=cross` reached 99.4% val top-1 on the digits.) Then `python src/eval.py ckpt_path=<its best>`, with
    nothing else given, takes the model/data/task of the run from <run>/.hydra/config.yaml (use_run_config): the
    default bidirectional model could not even load these weights."""
    cfg = assert_learns_on_digits(tmp_path, data_dir, ["model.scan=cross"])
    job = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"}
    record = tmp_path / ".hydra"  # what Hydra writes beside checkpoints/
    record.mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(job), record / "config.yaml")
    OmegaConf.save(OmegaConf.create(["model.scan=cross"]), record / "overrides.yaml")
    best, best_score = best_checkpoint_and_score(tmp_path)

    from eval import adopt_run_config, evaluate

    ecfg = make_fast(compose_config("eval.yaml", [f"ckpt_path={best}"]), tmp_path / "eval", data_dir)
    assert ecfg.use_run_config and ecfg.model.scan == "bidirectional"
    with open_dict(ecfg):
        ecfg.trainer.limit_test_batches = 1.0
    job = as_job(ecfg)
    adopt_run_config(job)
    assert job.model.scan == "cross" and job.ckpt_path == str(best)
    emetrics, _ = evaluate(job)
    assert float(emetrics["test/acc1"]) == pytest.approx(best_score, abs=1e-6)

    # a group given on the command line is kept, the others still come from the run
    ecfg = compose_config("eval.yaml", [f"ckpt_path={best}", "model=vim_digits", "++model.depth=2"])
    job = as_job(make_fast(ecfg, tmp_path / "eval2", data_dir))
    adopt_run_config(job)
    assert job.model.depth == 2 and job.model.scan == "bidirectional" and job.task == cfg.task
