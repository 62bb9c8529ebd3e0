"""The pictures the tasks make for people: detection drawings and segmentation overlays, and where they go."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vision_mamba.data.coco import collate_detection
from vision_mamba.tasks import detection
from vision_mamba.tasks.detection import DetectionTask, draw_predictions
from vision_mamba.tasks.segmentation import SegmentationTask, overlay_grid, palette


class Spy:
    """Wraps a drawing function: records each call's arguments, returns what the real one returns."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
    boxes, masks = Spy(detection.draw_bounding_boxes), Spy(detection.draw_segmentation_masks)
    monkeypatch.setattr(detection, "draw_bounding_boxes", boxes)
    monkeypatch.setattr(detection, "draw_segmentation_masks", masks)
    return boxes, masks


def nearest_x4(image: torch.Tensor) -> torch.Tensor:
    return image.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)


def test_a_small_image_is_drawn_four_times_larger_with_names_scores_and_masks(spies) -> None:
    boxes_spy, masks_spy = spies
    image = torch.full((3, 64, 80), 0.5)
    image[0, 0, 0], image[1, 0, 0] = -1.0, 2.0  # out of [0, 1]: clamped
    mask = torch.zeros(4, 1, 64, 80)
    mask[0, 0, 8:24, 8:24] = 1.0
    mask[0, 0, 40:48, 40:48] = 0.5  # exactly at the threshold: not part of the mask
    pred = {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 9.0, 9.0],
                                   [0.0, 0.0, 10.0, 10.0]]),
            "labels": torch.tensor([2, 0, 3, 1]), "scores": torch.tensor([0.9, 0.5, 0.75, 0.499]), "masks": mask}
    out = draw_predictions(image, pred, names=["square", "disc"])
    assert out.shape == (3, 256, 320) and out.dtype == torch.uint8  # 256 / 64 = 4
    (canvas, drawn_masks), kwargs = masks_spy.calls[0]
    upscaled = nearest_x4((image.clamp(0, 1) * 255).to(torch.uint8))
    assert torch.equal(canvas, upscaled) and canvas[0, 0, 0] == 0 and canvas[1, 0, 0] == 255 and canvas[2, 0, 0] == 127
    assert kwargs == {"alpha": 0.45}
    # the kept objects (score >= 0.5) in order, their masks resized to the canvas and cut at 0.5
    want = F.interpolate(mask[[0, 1, 2], 0][None], size=(256, 320), mode="bilinear")[0] > 0.5
    assert drawn_masks.dtype == torch.bool and torch.equal(drawn_masks, want)
    assert drawn_masks[0, 36:92, 36:92].all() and not drawn_masks[0, 160:192, 160:192].any()
    (_, boxes), kwargs = boxes_spy.calls[0]
    assert torch.equal(boxes, pred["boxes"][:3] * 4)
    # label 2 -> the second name; 0 (background) and 3 (past the names) -> the number itself
    assert kwargs == {"labels": ["disc 0.90", "0 0.50", "3 0.75"], "colors": "yellow", "width": 2}


def test_without_names_labels_are_numbers(spies) -> None:
    boxes_spy, _ = spies
    pred = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.6])}
    draw_predictions(torch.zeros(3, 32, 32), pred, names=None)
    draw_predictions(torch.zeros(3, 32, 32), pred, names=["only"], score_threshold=0.7)  # 0.6 < 0.7: nothing drawn
    assert [kwargs["labels"] for _, kwargs in boxes_spy.calls] == [["1 0.60"]]


def test_nothing_confident_returns_the_picture_and_a_large_one_keeps_its_size(spies) -> None:
    boxes_spy, masks_spy = spies
    pred = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
            "scores": torch.tensor([0.2]), "masks": torch.ones(1, 1, 64, 64)}
    out = draw_predictions(torch.full((3, 64, 64), 0.25), pred)
    assert torch.equal(out, torch.full((3, 256, 256), 63, dtype=torch.uint8))
    assert not boxes_spy.calls and not masks_spy.calls
    big = torch.rand(3, 256, 300)
    pred["scores"] = torch.tensor([0.8])
    pred["masks"] = torch.zeros(1, 1, 256, 300)
    pred["masks"][0, 0, :, :7] = 0.9
    out = draw_predictions(big, pred, mask_threshold=0.8)
    assert out.shape == (3, 256, 300)
    (canvas, drawn_masks), _ = masks_spy.calls[0]
    assert torch.equal(canvas, (big * 255).to(torch.uint8))
    assert torch.equal(drawn_masks, pred["masks"][:, 0] > 0.8)  # used as they are, at the given threshold
    assert torch.equal(boxes_spy.calls[0][0][1], pred["boxes"])


# ---- where the pictures go ------------------------------------------------------------------------------------------


class QuietLogger(Logger):
    """A logger that takes metrics and keeps nothing."""

    name, version = "quiet", 0

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class ImageLogger(QuietLogger):
    """A logger with log_image (the W&B interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []

    def log_image(self, **kwargs) -> None:
        self.images.append(kwargs)


class Board:
    def __init__(self) -> None:
        self.images: list[tuple] = []

    def add_image(self, *args, **kwargs) -> None:
        self.images.append((args, kwargs))


class BoardLogger(QuietLogger):
    """A logger whose experiment has add_image (the TensorBoard interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.board = Board()

    @property
    def experiment(self) -> Board:
        return self.board


def trainer(tmp_path: Path, loggers: list[Logger]) -> Trainer:
    return Trainer(accelerator="cpu", logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)


def test_segmentation_overlay_is_saved_and_sent_to_both_kinds_of_logger(tmp_path) -> None:
    # three validation images of 4x6 in batches of 2; overlay_images=2 keeps the first two
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 4, 6, generator=g)
    targets = torch.randint(0, 3, (3, 4, 6), generator=g)
    targets[0, 0, 0] = 255
    task = SegmentationTask(net=nn.Identity(), segmentor=lambda backbone: backbone, num_classes=3,
                            inference={"mode": "whole"}, overlay_images=2)
    wandb, board = ImageLogger(), BoardLogger()
    trainer(tmp_path, [wandb, board]).validate(task, DataLoader(TensorDataset(logits, targets), batch_size=2))
    saved = np.asarray(Image.open(tmp_path / "predictions" / "epoch_000.png"))
    assert saved.shape == (2 * 192, 3 * 288, 3)  # 192 px high, 4x6 -> 288 px wide per tile
    colours = palette()
    for row in range(2):
        tile = saved[row * 192 : (row + 1) * 192]
        truth, pred = tile[:, 288:576], tile[:, 576:]
        # nearest-neighbour tiles: each 48x48 block is one class colour
        want_truth = colours[targets[row].numpy()].repeat(48, 0).repeat(48, 1)
        want_pred = colours[logits[row].argmax(0).numpy()].repeat(48, 0).repeat(48, 1)
        assert np.array_equal(truth, want_truth) and np.array_equal(pred, want_pred)
        # the image tile: the logits (as an image) min-max stretched to 0..255, bilinearly resized
        image = logits[row]
        stretched = ((image - image.min()) / (image.max() - image.min()) * 255).byte().permute(1, 2, 0).numpy()
        want_image = np.asarray(Image.fromarray(stretched).resize((288, 192), Image.BILINEAR))
        assert np.array_equal(tile[:, :288], want_image)
    assert saved[:48, 288:336].max() == 0  # the ignored pixel is black
    assert [set(call) for call in wandb.images] == [{"key", "images", "step", "caption"}]
    call = wandb.images[0]
    assert call["key"] == "val/predictions" and call["step"] == 0
    assert call["caption"] == ["image | ground truth | prediction"] and np.array_equal(call["images"][0], saved)
    (args, kwargs), = board.board.images
    assert args[0] == "val/predictions" and np.array_equal(args[1], saved) and args[2] == 0
    assert kwargs == {"dataformats": "HWC"}


def test_overlay_keeps_validation_rows_only_up_to_the_limit_and_stretches_a_narrow_range(tmp_path) -> None:
    # overlay_images=1 and batches of 2: the first validation batch crosses the limit. A test run before must not
    # fill the overlay; the validation images span less than 1, so the stretch divides by that span
    g = torch.Generator().manual_seed(1)
    tested, validated = torch.randn(2, 3, 4, 6, generator=g), 0.01 * torch.randn(2, 3, 4, 6, generator=g)
    targets = torch.randint(0, 3, (2, 4, 6), generator=g)
    task = SegmentationTask(net=nn.Identity(), segmentor=lambda backbone: backbone, num_classes=3,
                            inference={"mode": "whole"}, overlay_images=1)
    run = trainer(tmp_path / "runs" / "seg", [])  # the run folder does not exist yet
    run.test(task, DataLoader(TensorDataset(tested, targets), batch_size=2), verbose=False)
    stretched = (validated[0] - validated[0].min()) / (validated[0].max() - validated[0].min()) * 255
    want_image = np.asarray(Image.fromarray(stretched.byte().permute(1, 2, 0).numpy()).resize((288, 192),
                                                                                               Image.BILINEAR))
    for _ in range(2):  # a second validation writes into the existing folder
        run.validate(task, DataLoader(TensorDataset(validated, targets), batch_size=2), verbose=False)
        saved = np.asarray(Image.open(tmp_path / "runs" / "seg" / "predictions" / "epoch_000.png"))
        assert saved.shape == (192, 3 * 288, 3)  # one row: 4x6 tiles 192 px high
        assert np.array_equal(saved[:, :288], want_image)


def test_a_mask_under_one_pixel_wide_at_the_tile_height_gets_one_pixel_column() -> None:
    row = (np.zeros((400, 1, 3), np.uint8), np.zeros((400, 1), np.uint8), np.ones((400, 1), np.uint8))
    grid = overlay_grid([row], height=192)  # 192 * 1 / 400 rounds to 0
    colours = palette()
    assert grid.shape == (192, 3, 3)
    assert (grid[:, 0] == 0).all() and (grid[:, 1] == colours[0]).all() and (grid[:, 2] == colours[1]).all()


def test_overlay_rows_of_different_widths_are_padded_on_the_right() -> None:
    wide = (np.zeros((2, 4, 3), np.uint8), np.zeros((2, 4), np.uint8), np.ones((2, 4), np.uint8))
    narrow = (np.full((4, 2, 3), 255, np.uint8), np.ones((4, 2), np.uint8), np.zeros((4, 2), np.uint8))
    grid = overlay_grid([wide, narrow], height=8)
    assert grid.shape == (16, 3 * 16, 3)  # 2x4 at height 8 -> 16 wide; 4x2 -> 4 wide
    colours = palette()
    assert np.array_equal(grid[:8, 16:32], np.broadcast_to(colours[0], (8, 16, 3)))
    assert np.array_equal(grid[8:, 4:8], np.broadcast_to(colours[1], (8, 4, 3)))
    assert grid[8:, 12:].max() == 0 and grid[8:, :4].min() == 255  # padding is black, on the right only


def test_the_palette_is_fixed_bright_and_black_for_ignored_pixels() -> None:
    colours = palette()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert np.array_equal(colours, palette())  # the same colours every epoch and every run
    assert (colours[255] == 0).all() and colours[:255].min() >= 40
    assert len({tuple(c) for c in colours[:150]}) == 150  # ADE20K's classes all differ
    assert colours[:255].max() == 255 and tuple(colours[0]) == tuple(np.random.default_rng(3).integers(40, 256, 3))


class ReplayDetector(nn.Module):
    """A 'detector' whose prediction for every image is the one given."""

    prediction: dict = {}

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        return [dict(self.prediction) for _ in images]


def detection_sample(image_id: int, objects: int, value: float) -> tuple[torch.Tensor, dict]:
    return (torch.full((3, 32, 32), value), {
        "image_id": image_id, "boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]] * objects),
        "labels": torch.ones(objects, dtype=torch.int64), "masks": torch.ones(objects, 32, 32, dtype=torch.uint8),
        "iscrowd": torch.zeros(objects)})


def test_detection_draws_the_first_image_with_objects_each_validation_epoch(tmp_path) -> None:
    ReplayDetector.prediction = {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([1]),
                                 "scores": torch.tensor([0.9]), "masks": torch.ones(1, 1, 32, 32)}
    task = DetectionTask(net=nn.Identity(), detector=ReplayDetector, num_classes=1)
    samples = [detection_sample(0, 0, 0.1), detection_sample(1, 1, 0.6), detection_sample(2, 1, 0.9)]
    wandb, board = ImageLogger(), BoardLogger()
    trainer(tmp_path, [wandb, board]).validate(
        task, DataLoader(samples, batch_size=1, collate_fn=collate_detection), verbose=False)
    saved = np.asarray(Image.open(tmp_path / "predictions" / "epoch_000.png"))
    want = draw_predictions(samples[1][0], ReplayDetector.prediction).permute(1, 2, 0).numpy()
    assert np.array_equal(saved, want)  # image 1: the first with objects (image 0 has none), not image 2
    assert [call["key"] for call in wandb.images] == ["val/predictions"]
    assert np.array_equal(wandb.images[0]["images"][0], want) and wandb.images[0]["step"] == 0
    (args, kwargs), = board.board.images
    assert args[0] == "val/predictions" and torch.equal(args[1], torch.from_numpy(want).permute(2, 0, 1))
    assert kwargs == {"global_step": 0}
    assert task._drawn is None  # handed over, so the next epoch draws afresh


def test_label_one_is_the_first_name_and_only_a_short_side_under_256_is_upscaled(spies) -> None:
    boxes_spy, _ = spies
    pred = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    assert draw_predictions(torch.zeros(3, 100, 300), pred, names=["only"]).shape == (3, 256, 768)  # x 2.56
    assert boxes_spy.calls[0][1]["labels"] == ["only 0.80"]
    assert torch.allclose(boxes_spy.calls[0][0][1], pred["boxes"] * 2.56)
    assert draw_predictions(torch.zeros(3, 300, 320), pred).shape == (3, 300, 320)  # both sides over 256: as it is
