"""Semantic segmentation: the ADE20K loader, sliding-window inference, mIoU, the Segmentor and the configs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from helpers import ROOT, compose_config, make_fast, run_train
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from vision_mamba.data.ade20k import ADE20KDataModule, RescaleToFit
from vision_mamba.data.errors import DatasetError
from vision_mamba.tasks.segmentation import SegmentationTask, slide_inference, window_starts

SIZES = [(40, 56), (48, 40), (36, 64)]  # (H, W): deliberately not square and not multiples of the patch


def write_tiny_ade(root: Path, num_classes: int = 5, per_split=(6, 3), nest: bool = True, sizes=SIZES) -> Path:
    """A tiny ADE20K release: images/{training,validation}/*.jpg, annotations/.../*.png with labels 0..num_classes
    (0 = "other"); each class is a coloured band, so the task is learnable. Image i has size ``sizes[i % len]``."""
    rng = np.random.default_rng(0)
    base = root / "ADEChallengeData2016" if nest else root
    for split, count in zip(("training", "validation"), per_split):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = sizes[i % len(sizes)]
            mask = np.repeat(np.arange(w)[None, :] * (num_classes + 1) // w, h, axis=0).astype(np.uint8)
            image = (mask[..., None] * np.array([40, 25, 10]) + rng.integers(0, 20, (h, w, 3))).clip(0, 255)
            Image.fromarray(image.astype(np.uint8)).save(base / "images" / split / f"ADE_{split}_{i:04d}.jpg")
            Image.fromarray(mask).save(base / "annotations" / split / f"ADE_{split}_{i:04d}.png")
    return root


def fast(cfg, tmp_path: Path, data_dir: Path, csv: bool = False):
    """conftest's make_fast; LearningRateMonitor needs a logger, so keep CSV or drop the monitor."""
    cfg = make_fast(cfg, tmp_path, data_dir)
    with open_dict(cfg):
        # compose() leaves these unset; train() reads them (to pin DDP re-launches to this run)
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
        if csv:
            cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.csv_logs.CSVLogger",
                                  "save_dir": str(tmp_path), "name": "csv"}}
        else:
            cfg.callbacks.pop("lr_monitor", None)
    return cfg


def ade_overrides(root: Path, *extra: str) -> list[str]:
    return ["experiment=shapes_seg", "data=ade20k", f"data.root={root}", "data.num_classes=5", "data.img_size=32",
            "data.scale=[128,32]", "data.batch_size=2", "model.scan_backend=torch", "task.segmentor.aux_channels=16",
            "task.schedule.warmup_steps=1", *extra]


# ---- the ADE20K loader end to end ---------------------------------------------------------------------------------


def test_ade20k_layout_fit_and_test_through_train_py(tmp_path, data_dir) -> None:
    root = write_tiny_ade(tmp_path / "ade")
    cfg = fast(compose_config("train.yaml", ade_overrides(root)), tmp_path / "run", data_dir, csv=True)
    metrics = run_train(cfg)
    assert math.isfinite(float(metrics["train/loss_epoch"]))
    for key in ("val/mIoU", "val/pixel_acc", "val/mIoU_best", "test/mIoU", "test/pixel_acc"):
        assert 0.0 <= float(metrics[key]) <= 1.0, key
    overlay = Path(cfg.paths.output_dir, "predictions", "epoch_000.png")
    assert overlay.is_file()
    # 2 rows (val batch 1, limit_val_batches=2) of image | truth | prediction at 192 px height
    assert np.asarray(Image.open(overlay)).shape[0] == 2 * 192


def test_root_may_be_the_release_folder_itself_and_labels_are_reduced(tmp_path) -> None:
    root = write_tiny_ade(tmp_path / "ade")
    for given in (root, root / "ADEChallengeData2016"):
        dm = ADE20KDataModule(root=str(given), num_classes=5, img_size=32, scale=(128, 32), batch_size=2,
                              num_workers=0)
        dm.setup("fit")
        assert len(dm.data_train) == 6 and len(dm.data_val) == 3
    image, mask = dm.data_val[0]
    h, w = SIZES[0]
    assert tuple(mask.shape) == (h, w), "eval masks keep the annotation's size"
    assert min(image.shape[-2:]) == 32, "eval images are resized to the short side of the scale"
    raw = np.asarray(Image.open(dm.data_val.pairs[0][1]))
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    assert np.array_equal(mask.numpy(), expected)
    image, mask = dm.data_train[0]
    assert tuple(image.shape) == (3, 32, 32) and tuple(mask.shape) == (32, 32)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_rescale_to_fit_follows_mmseg_keep_ratio_rule() -> None:
    out = RescaleToFit((2048, 512))(image=np.zeros((300, 400, 3), np.uint8), mask=np.zeros((300, 400), np.uint8))
    assert out["image"].shape[:2] == (512, 683) and out["mask"].shape == (512, 683)
    # very wide: the long side bound (2048) wins
    out = RescaleToFit((2048, 512))(image=np.zeros((100, 1000, 3), np.uint8))
    assert out["image"].shape[:2] == (205, 2048)


# ---- user errors ---------------------------------------------------------------------------------------------------


def test_missing_root_and_image_without_annotation_name_the_problem(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ADE20KDataModule(root=str(tmp_path / "nope"), num_workers=0).setup("fit")
    root = write_tiny_ade(tmp_path / "ade")
    orphan = root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_training_0003.png"
    orphan.unlink()
    with pytest.raises(DatasetError, match=r"ADE_training_0003\.jpg has no annotation"):
        ADE20KDataModule(root=str(root), num_workers=0).setup("fit")


def test_label_outside_range_is_a_short_error_naming_the_mask(tmp_path) -> None:
    """Through src/train.py, with the mask read in a DataLoader worker: one `error:` line, no traceback."""
    root = write_tiny_ade(tmp_path / "ade")
    bad = root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_validation_0000.png"
    mask = np.asarray(Image.open(bad)).copy()
    mask[0, 0] = 151
    Image.fromarray(mask).save(bad)
    args = ade_overrides(root, "data.num_classes=150", "data.num_workers=1", "data.persistent_workers=false",
                         "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                         "extras.print_config=false")
    env = {**os.environ, "VIM_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ADE_validation_0000.png holds label 151, outside 0-150" in proc.stderr, proc.stderr[-3000:]


# ---- sliding-window inference -------------------------------------------------------------------------------------


def test_window_starts_cover_the_axis_like_mmseg() -> None:
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(40, 512, 341) == [0]
    assert window_starts(1100, 512, 341) == [0, 341, 588]
    assert window_starts(513, 512, 341) == [0, 1]  # one pixel past the crop still gets its flush window


def test_slide_equals_a_direct_forward_for_a_per_pixel_net() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 1)  # per-pixel: every window sees the same thing as the whole image
    image = torch.randn(2, 3, 70, 100)
    with torch.no_grad():
        direct = net(image)
    assert torch.allclose(slide_inference(net, image, 4, crop=32, stride=21), direct, atol=1e-6)
    # a window that covers the whole image is a direct forward, even for a net that looks at the whole input
    glob = lambda x: net(x) + x.mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    small = torch.randn(1, 3, 32, 32)
    assert torch.allclose(slide_inference(glob, small, 4, crop=32, stride=21), glob(small), atol=1e-6)


def test_slide_averages_overlapping_windows() -> None:
    """Each window predicts its own mean everywhere: a pixel's result is the mean over the windows that cover it."""
    image = torch.arange(40 * 50, dtype=torch.float32).reshape(1, 1, 40, 50)
    net = lambda x: x.mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])  # noqa: E731
    got = slide_inference(net, image, 1, crop=32, stride=16)[0, 0]
    expected = torch.zeros(40, 50)
    count = torch.zeros(40, 50)
    for y in window_starts(40, 32, 16):
        for x in window_starts(50, 32, 16):
            expected[y : y + 32, x : x + 32] += image[0, 0, y : y + 32, x : x + 32].mean()
            count[y : y + 32, x : x + 32] += 1
    assert count.min() >= 1 and count.max() > 1
    assert torch.allclose(got, expected / count)


# ---- metrics ------------------------------------------------------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """Returns one-hot logits of a fixed prediction, whatever the input."""

    def __init__(self, pred: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float())
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits + self.bias


def validate(pred: torch.Tensor, target: torch.Tensor, tmp_path: Path) -> dict:
    from lightning import Trainer

    task = SegmentationTask(net=FixedLogits(pred, 4), segmentor=lambda backbone: backbone, num_classes=4,
                            inference={"mode": "whole"})
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    images = torch.zeros(pred.shape[0], 3, *pred.shape[-2:])
    loader = DataLoader(TensorDataset(images, target), batch_size=len(images))
    return trainer.validate(task, dataloaders=loader, verbose=False)[0]


def test_miou_of_a_perfect_prediction_is_one(tmp_path) -> None:
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 255]]])
    metrics = validate(target.clamp(max=3), target, tmp_path)
    assert metrics["val/mIoU"] == pytest.approx(1.0) and metrics["val/pixel_acc"] == pytest.approx(1.0)


def test_miou_of_a_known_confusion(tmp_path) -> None:
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 3]]])
    # labelled pixels only: class 0 I=1 U=3, class 1 I=2 U=3, class 2 I=1 U=2; class 3 absent from both -> skipped
    metrics = validate(pred, target, tmp_path)
    assert metrics["val/mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert metrics["val/pixel_acc"] == pytest.approx(4 / 6)
    assert Path(tmp_path, "predictions", "epoch_000.png").is_file()


# ---- the Segmentor and its optimiser plumbing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmentor():
    from vision_mamba.models.factory import create_model
    from vision_mamba.models.heads.upernet import Segmentor

    backbone = create_model("vim_digits", img_size=64, patch_size=16, num_classes=10, scan_backend="torch")
    return Segmentor(backbone, num_classes=3, aux_channels=8)


def test_segmentor_builds_a_stride_4_to_32_pyramid(segmentor) -> None:
    from vision_mamba.models.necks import evenly_spaced_indices

    assert evenly_spaced_indices(24) == [5, 11, 17, 23] and segmentor.out_indices == [0, 1, 2, 3]
    assert isinstance(segmentor.backbone.head, torch.nn.Identity), "the classifier is dropped"
    x = torch.randn(2, 3, 64, 96)  # not the backbone's img_size: the pos-embed is resized on the fly
    with torch.no_grad():
        pyramid = segmentor.pyramid(x)
        logits, aux = segmentor.eval()(x, with_aux=True)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert logits.shape == aux.shape == (2, 3, 64, 96)


def test_segmentor_layer_decay_groups_and_no_weight_decay(segmentor) -> None:
    from vision_mamba.tasks.optim import build_param_groups

    groups = build_param_groups(segmentor, weight_decay=0.05, layer_decay=0.9)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(segmentor.named_parameters())
    head = params["decode_head.classifier.weight"]
    assert scale_of[id(head)] == 1.0 and scale_of[id(params["neck.levels.0.0.weight"])] == 1.0
    # stem < block 0 < block 3 < head, each step a factor 0.9 (4 blocks: stem 0.9^5)
    assert scale_of[id(params["backbone.pos_embed"])] == pytest.approx(0.9**5)
    assert scale_of[id(params["backbone.layers.0.norm.weight"])] == pytest.approx(0.9**4)
    assert scale_of[id(params["backbone.layers.3.norm.weight"])] == pytest.approx(0.9)
    nwd = segmentor.no_weight_decay()
    assert "backbone.pos_embed" in nwd and all(n.startswith("backbone.") for n in nwd)
    assert decay_of[id(params["backbone.cls_token"])] == 0.0 and decay_of[id(head)] == 0.05


# ---- configs and the embedded default -----------------------------------------------------------------------------


def test_shapes_seg_experiment_selects_the_embedded_shapes_and_a_small_backbone() -> None:
    cfg = compose_config("train.yaml", ["experiment=shapes_seg"])
    choices = cfg.hydra.runtime.choices
    assert (choices.data, choices.model, choices.recipe) == ("shapes_seg", "vim_seg_shapes", "shapes_seg")
    assert cfg.optimized_metric == "val/mIoU_best" and cfg.task.monitor == "val/mIoU"
    cfg = compose_config("train.yaml", ["task=segmentation", "data=ade20k", "data.root=/x", "model=vim_tiny"])
    assert cfg.hydra.runtime.choices.recipe == "ade20k" and cfg.model.img_size == 512
    assert cfg.task.schedule.kind == "poly" and cfg.task.schedule.warmup_steps == 1500 and cfg.task.layer_decay == 0.92


def test_ade20k_experiment_is_the_released_vim_tiny_recipe() -> None:
    cfg = compose_config("train.yaml", ["experiment=ade20k_upernet_vim_tiny"])
    assert cfg.trainer.max_steps == 60000 and cfg.data.batch_size == 32 and cfg.trainer.sync_batchnorm
    assert (cfg.task.base_lr, cfg.task.weight_decay, cfg.task.layer_decay) == (2e-4, 0.1, 0.92)
    assert list(cfg.task.segmentor.out_indices) == [5, 11, 17, 23] and cfg.task.inference.stride == 341


def test_shapes_seg_default_writes_the_ade_layout_once_and_trains(tmp_path, data_dir) -> None:
    cfg = compose_config("train.yaml", ["experiment=shapes_seg", "data.num_train=16", "data.num_val=8",
                                        "data.batch_size=4", "data.val_batch_size=4", "model.scan_backend=torch"])
    cfg = fast(cfg, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.data.root = str(tmp_path / "shapes")
    metrics = run_train(cfg)
    release = tmp_path / "shapes" / "ADEChallengeData2016"
    assert len(list((release / "images" / "training").glob("*.jpg"))) == 16
    assert len(list((release / "annotations" / "validation").glob("*.png"))) == 8
    assert (tmp_path / "shapes" / ".complete").is_file() and not list(tmp_path.glob(".shapes-*"))
    assert 0.0 <= float(metrics["test/mIoU"]) <= 1.0
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("validate")
    assert int(dm.data_val[0][1].max()) <= 3 and int(dm.data_val[0][1].min()) >= 0  # background is a real class


def test_validation_batches_stack_only_same_size_pairs() -> None:
    from vision_mamba.data.ade20k import collate_same_size

    a, b = (torch.zeros(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64)), (torch.ones(3, 4, 5), torch.ones(4, 5))
    images, masks = collate_same_size([a, b])
    assert images.shape == (2, 3, 4, 5) and torch.equal(images[1], b[0]) and masks.shape == (2, 4, 5)
    message = "validation images differ in size and cannot share a batch: set data.val_batch_size=1"
    for other in ((torch.zeros(3, 4, 6), torch.zeros(4, 5)), (torch.zeros(3, 4, 5), torch.zeros(4, 6))):
        with pytest.raises(DatasetError) as error:  # the image or only the mask of another size
            collate_same_size([a, other])
        assert str(error.value) == message


def test_training_batches_are_shuffled_and_full_validation_keeps_file_order_and_every_pair(tmp_path) -> None:
    # 5 training pairs in batches of 2: two full batches (the odd one dropped), drawn in a random order;
    # 7 validation pairs of one size in batches of 2: three batches of 2 then the last one, in file order (a shuffle
    # keeps the file order once in 5040)
    root = write_tiny_ade(tmp_path / "ade", per_split=(5, 7), sizes=[(40, 56)])
    dm = ADE20KDataModule(root=str(root), num_classes=5, img_size=32, scale=(128, 32), batch_size=2,
                          val_batch_size=2, num_workers=0, photometric=False)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler)
    assert [tuple(images.shape) for images, _ in train] == [(2, 3, 32, 32)] * 2
    batches = list(dm.val_dataloader())
    assert [len(masks) for _, masks in batches] == [2, 2, 2, 1]
    files = sorted((root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))
    raw = [np.asarray(Image.open(f)).astype(np.int64) for f in files]
    expected = np.stack([np.where(m == 0, 255, m - 1) for m in raw])  # reduce_zero_label
    assert np.array_equal(torch.cat([masks for _, masks in batches]).numpy(), expected)
    # the masks are alike (bands); the images' noise tells the order: that of the sorted files
    assert [image.name for image, _ in dm.data_val.pairs] == [f.with_suffix(".jpg").name for f in files]
    assert torch.equal(torch.cat([images for images, _ in batches]), torch.stack([x for x, _ in dm.data_val]))
    # pairs of different sizes cannot share a validation batch: the loader says so instead of torch.stack failing
    mixed = ADE20KDataModule(root=str(write_tiny_ade(tmp_path / "mixed")), num_classes=5, img_size=32,
                             scale=(128, 32), batch_size=2, val_batch_size=2, num_workers=0)
    mixed.setup("validate")
    with pytest.raises(DatasetError, match="set data.val_batch_size=1"):
        next(iter(mixed.val_dataloader()))


@pytest.mark.parametrize("reduce_zero_label", [False, True])
def test_label_histogram_sums_masks_and_reports_the_ignored_share(reduce_zero_label: bool) -> None:
    from vision_mamba.data.ade20k import LabelHistogram

    histogram = LabelHistogram(reduce_zero_label)
    assert str(histogram) == "no mask read"
    first, second = np.zeros(256, np.int64), np.zeros(256, np.int64)
    first[[0, 3, 255]] = (1, 5, 2)
    second[[0, 7]] = (3, 1)
    histogram.add(first)
    histogram.add(second)
    ignored, share = (0, 4 / 12) if reduce_zero_label else (255, 2 / 12)
    assert str(histogram) == f"0-255 (4 distinct; label {ignored}, ignored: {share:.1%} of pixels)"
