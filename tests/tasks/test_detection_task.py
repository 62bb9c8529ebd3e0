"""DetectionTask's COCO numbers on a hand-made case whose AP is known, through Lightning's validation loop."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning import Trainer
from torch import nn
from torch.utils.data import DataLoader

from vision_mamba.data.coco import collate_detection
from vision_mamba.tasks.detection import DetectionTask

SIZE = 128


def box_mask(box: list[float]) -> torch.Tensor:
    x0, y0, x1, y1 = (int(v) for v in box)
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def target(image_id: int, boxes: list[list[float]], labels: list[int]) -> dict:
    return {"image_id": image_id, "boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
            "masks": torch.stack([box_mask(b) for b in boxes]).to(torch.uint8), "iscrowd": torch.zeros(len(boxes))}


def prediction(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict:
    return {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "scores": torch.tensor(scores),
            "masks": torch.stack([box_mask(b) for b in boxes]).float()[:, None]}


# Two 128x128 images, one ground-truth object each, all objects large (area 10000 > 96^2); masks fill their boxes,
# so box and mask IoUs are equal.
#   class 1: truth on image 0. Predicted exactly (score 0.8) and, on image 1, a false positive scored higher (0.9):
#            precision 1/2 at recall 1 -> AP 0.5 at every IoU threshold.
#   class 2: truth [0, 0, 100, 100] on image 1, one prediction [0, 0, 100, 62]: IoU 6200 / 10000 = 0.62, a hit at
#            thresholds 0.50, 0.55, 0.60 of the ten -> AP 0.3; AP50 1, AP75 0; recall 0.3 averaged likewise.
DATA = [
    (target(0, [[0, 0, 100, 100]], [1]), prediction([[0, 0, 100, 100]], [1], [0.8])),
    (target(1, [[0, 0, 100, 100]], [2]), prediction([[10, 10, 110, 110], [0, 0, 100, 62]], [1, 2], [0.9, 0.7])),
]
EXPECTED = {
    "mAP": (0.5 + 0.3) / 2,
    "mAP_50": (0.5 + 1.0) / 2,
    "mAP_75": (0.5 + 0.0) / 2,
    "mAP_l": (0.5 + 0.3) / 2,
    "mAR_100": (1.0 + 0.3) / 2,
    "mAP_s": -1.0,  # COCO's "no ground truth in this range", not a score
    "mAP_m": -1.0,
}


class Replay(nn.Module):
    """A 'detector' that returns the prepared prediction of each image (its index is the image's first pixel)."""

    def __init__(self, backbone: nn.Module, num_classes: int, predictions: list[dict]) -> None:
        super().__init__()
        self.predictions = predictions

    def forward(self, images: list[torch.Tensor], targets=None) -> list[dict]:
        return [self.predictions[int(image[0, 0, 0])] for image in images]


def test_box_and_mask_ap_of_a_hand_made_case(tmp_path) -> None:
    samples = [(torch.full((3, SIZE, SIZE), float(i)), t) for i, (t, _) in enumerate(DATA)]
    loader = DataLoader(samples, batch_size=1, collate_fn=collate_detection)  # the AP accumulates over batches
    task = DetectionTask(net=nn.Identity(), detector=partial(Replay, predictions=[p for _, p in DATA]), num_classes=2,
                         draw_predictions=False)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    metrics = trainer.validate(task, dataloaders=loader, verbose=False)[0]
    for iou in ("bbox", "segm"):
        for name, value in EXPECTED.items():
            assert metrics[f"val/{iou}_{name}"] == pytest.approx(value, abs=1e-6), (iou, name)
    assert metrics["val/bbox_mAP_best"] == pytest.approx(0.4, abs=1e-6)
