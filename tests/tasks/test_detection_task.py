"""DetectionTask's COCO numbers on a hand-made case whose AP is known, through Lightning's validation loop."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from lightning import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

from vision_mamba.data.coco import CategoryMap, collate_detection
from vision_mamba.tasks import detection
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


class Recorder(nn.Module):
    """A 'detector' that records what it is called with and answers with one fixed prediction per image."""

    prediction = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 7.0]]), "labels": torch.tensor([2]),
                  "scores": torch.tensor([0.75]), "masks": torch.ones(1, 1, 8, 8)}

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.calls = []

    def forward(self, images, targets=None):
        self.calls.append((images, targets))
        return [{k: v.clone() for k, v in self.prediction.items()} for _ in images]


def test_forward_hands_images_and_targets_to_the_detector() -> None:
    task = DetectionTask(net=nn.Identity(), detector=Recorder, num_classes=2)
    images, targets = [torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    task(images, targets)
    task(images)
    assert [(i is images, t is targets) for i, t in task.net.calls] == [(True, True), (True, False)]
    assert task.net.calls[1][1] is None


def test_coco_results_round_boxes_and_scores_and_cut_masks_above_the_threshold() -> None:
    from pycocotools import mask as mask_utils

    from vision_mamba.tasks.detection import to_coco_results

    soft = torch.zeros(1, 1, 4, 5)
    soft[0, 0, 0, 0], soft[0, 0, 1, 1], soft[0, 0, 2, 3] = 0.9, 0.5, 0.51  # 0.5 is not above the threshold 0.5
    pred = {"boxes": torch.tensor([[1.256, 2.0, 5.5, 7.123]]), "labels": torch.tensor([2]),
            "scores": torch.tensor([0.1234567]), "masks": soft}
    (entry,) = to_coco_results(pred, 7, {2: 18}.__getitem__)
    # x, y, w = 5.5 - 1.256, h = 7.123 - 2 to hundredths of a pixel; the score to five places
    assert entry["image_id"] == 7 and entry["category_id"] == 18
    assert entry["bbox"] == [1.26, 2.0, 4.24, 5.12] and entry["score"] == 0.12346
    want = torch.zeros(4, 5, dtype=torch.uint8)
    want[0, 0] = want[2, 3] = 1
    assert entry["segmentation"]["size"] == [4, 5]
    assert (mask_utils.decode({"size": [4, 5], "counts": entry["segmentation"]["counts"].encode()}) == want.numpy()).all()
    # the prediction itself is left as it was: it is drawn after its results are written
    assert pred["boxes"].tolist() == torch.tensor([[1.256, 2.0, 5.5, 7.123]]).tolist()


class Labelled(LightningDataModule):
    """Two images and the label <-> COCO category map a CocoDataModule carries."""

    categories = CategoryMap([{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}])

    def val_dataloader(self) -> DataLoader:
        return DataLoader(SAMPLES, batch_size=2, collate_fn=collate_detection)


SAMPLES = [(torch.zeros(3, 8, 8), {"image_id": i, "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
                                   "labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.uint8),
                                   "iscrowd": torch.zeros(1)}) for i in (4, 9)]


@pytest.mark.parametrize("with_categories", [True, False])
def test_validation_writes_results_by_category_id_and_draws_with_names(tmp_path, monkeypatch, with_categories) -> None:
    """With a datamodule that maps labels to COCO categories, results carry category ids and drawings names; without
    one (plain loaders), the labels themselves and no names."""
    drawn = []
    monkeypatch.setattr(detection, "draw_predictions", lambda *args: drawn.append(args) or torch.zeros(3, 8, 8,
                                                                                                       dtype=torch.uint8))
    task = DetectionTask(net=nn.Identity(), detector=Recorder, num_classes=2, write_results=True,
                         output_dir=str(tmp_path / "out"))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    if with_categories:
        trainer.validate(task, datamodule=Labelled(), verbose=False)
    else:
        trainer.validate(task, DataLoader(SAMPLES, batch_size=2, collate_fn=collate_detection), verbose=False)
    category, names = (7, ["cat", "dog"]) if with_categories else (2, None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["coco_results_val.json", "predictions"]
    results = json.loads((tmp_path / "out" / "coco_results_val.json").read_text())
    assert results == [{"image_id": i, "category_id": category, "bbox": [1.0, 2.0, 4.0, 5.0], "score": 0.75,
                        "segmentation": results[0]["segmentation"]} for i in (4, 9)]
    (image, pred, drawn_names, score_threshold, mask_threshold), = drawn
    assert drawn_names == names and pred["boxes"].tolist() == [[1.0, 2.0, 5.0, 7.0]]


def test_results_are_gathered_from_every_process(tmp_path) -> None:
    """Through torch.distributed's gather, here in a one-process group: what each process wrote, in rank order."""
    import torch.distributed as dist

    task = DetectionTask(net=nn.Identity(), detector=Recorder, num_classes=2, write_results=True,
                         output_dir=str(tmp_path))
    task._results = [{"image_id": 1, "category_id": 3}]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        task._write_results("test")
    finally:
        dist.destroy_process_group()
    assert json.loads((tmp_path / "coco_results_test.json").read_text()) == [{"image_id": 1, "category_id": 3}]
    assert task._results == []


def test_the_coco_backend_is_faster_coco_eval_where_installed(monkeypatch) -> None:
    import importlib.util

    from vision_mamba.tasks.detection import coco_backend

    assert importlib.util.find_spec("faster_coco_eval") is not None  # a dependency of the project
    assert coco_backend() == "faster_coco_eval"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "faster_coco_eval" else find_spec(name))
    assert coco_backend() == "pycocotools"


def test_the_mask_threshold_cuts_the_scored_and_the_written_masks_alike(tmp_path) -> None:
    """One object, box and mask [0, 0, 100, 100]; the predicted mask is 1 on rows 0-61, exactly the threshold (0.7) on
    rows 62-79 and 0.6 on rows 80-99. Cut above 0.7: mask IoU 0.62, a hit at 0.50, 0.55, 0.60 -> segm AP 0.3 (the box
    is exact: bbox AP 1); the results json holds rows 0-61 only."""
    from pycocotools import mask as mask_utils

    soft = torch.zeros(1, 1, SIZE, SIZE)
    soft[0, 0, :62, :100], soft[0, 0, 62:80, :100], soft[0, 0, 80:100, :100] = 1.0, 0.7, 0.6
    pred = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([1]),
            "scores": torch.tensor([0.9]), "masks": soft}
    samples = [(torch.zeros(3, SIZE, SIZE), target(0, [[0, 0, 100, 100]], [1]))]
    task = DetectionTask(net=nn.Identity(), detector=partial(Replay, predictions=[pred]), num_classes=1,
                         draw_predictions=False, mask_threshold=0.7, write_results=True, output_dir=str(tmp_path))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    metrics = trainer.validate(task, DataLoader(samples, collate_fn=collate_detection), verbose=False)[0]
    assert metrics["val/bbox_mAP"] == pytest.approx(1.0) and metrics["val/segm_mAP"] == pytest.approx(0.3)
    (result,) = json.loads((tmp_path / "coco_results_val.json").read_text())
    want = box_mask([0, 0, 100, 62]).numpy()
    assert (mask_utils.decode({"size": [SIZE, SIZE], "counts": result["segmentation"]["counts"].encode()}) == want).all()
