"""Detection (issue #7): the COCO loader, the embedded shapes, the Vim Mask R-CNN and a fit/test through train.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config, make_fast, run_train
from omegaconf import open_dict
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vision_mamba.data.coco import (
    CategoryMap,
    CocoDataModule,
    CocoInstances,
    collate_detection,
    train_transform,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from vision_mamba.data.errors import DatasetError
from vision_mamba.data.shapes_det import write_shapes_coco
from vision_mamba.models.factory import create_model
from vision_mamba.models.heads.mask_rcnn import VimPyramidBackbone, VimRCNN
from vision_mamba.tasks.detection import DetectionTask, to_coco_results
from vision_mamba.tasks.optim import build_param_groups

CATS = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}, {"id": 11, "name": "triangle"}]
SMALL_HEADS = ["task.detector.out_channels=32", "task.detector.representation_size=64",
               "task.detector.mask_channels=32", "task.detector.mask_convs=1",
               "task.detector.anchor_sizes=[8,16,32,64,128]", "task.detector.rpn_pre_nms_top_n_test=100",
               "task.detector.rpn_post_nms_top_n_test=50", "task.detector.box_batch_size_per_image=64"]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _ann(ann_id, image_id, cat, seg, mask, crowd=0):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": crowd, "segmentation": seg,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def write_tiny_coco(root: Path, extra_anns: list[dict] | None = None) -> Path:
    """5 images per split: a polygon square, an RLE disc, a polygon triangle, a crowd region, one empty image."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(1, 6):
            w, h = 72 + 4 * i, 60
            img = Image.fromarray(rng.integers(0, 50, (h, w, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)

            def add(seg, mask, cat, crowd=0, anns=anns, image_id=i):
                anns.append(_ann(len(anns) + 1, image_id, cat, seg, mask, crowd))

            if i != 5:  # image 5 has no annotation at all
                square = [6.0 + i, 8.0, 30.0 + i, 8.0, 30.0 + i, 32.0, 6.0 + i, 32.0]
                draw.polygon(square, fill=(230, 40, 40))
                m = Image.new("L", (w, h)); ImageDraw.Draw(m).polygon(square, fill=1)  # noqa: E702
                add([square], np.asarray(m), 3)
                disc = [40, 20, 62, 42]
                draw.ellipse(disc, fill=(40, 230, 40))
                m = Image.new("L", (w, h)); ImageDraw.Draw(m).ellipse(disc, fill=1)  # noqa: E702
                add(_rle(np.asarray(m)), np.asarray(m), 7)  # compressed RLE
            if i in (2, 4):
                tri = [10.0, 55.0, 30.0, 38.0, 34.0, 57.0]
                draw.polygon(tri, fill=(40, 40, 230))
                m = Image.new("L", (w, h)); ImageDraw.Draw(m).polygon(tri, fill=1)  # noqa: E702
                add([tri], np.asarray(m), 11)
            if i == 3:  # a crowd region in uncompressed RLE, as COCO stores them
                m = np.zeros((h, w), np.uint8)
                m[44:56, 44:60] = 1
                flat = m.flatten(order="F")
                counts = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
                add({"size": [h, w], "counts": counts}, m, 7, crowd=1)
            img.save(root / split / f"{i:012d}.jpg", quality=95)
            images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
        anns += extra_anns or []
        data = {"images": images, "annotations": anns, "categories": CATS}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


# ---- conversions ---------------------------------------------------------------------------------------------------
def test_box_and_category_conversions_round_trip() -> None:
    xywh = np.array([[10.5, 20.0, 30.0, 5.25], [0.0, 0.0, 1.0, 2.0]], np.float32)
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_allclose(xyxy, [[10.5, 20.0, 40.5, 25.25], [0.0, 0.0, 1.0, 2.0]])
    np.testing.assert_allclose(xyxy_to_xywh(xyxy), xywh)
    t = torch.tensor(xywh)
    assert torch.allclose(xyxy_to_xywh(xywh_to_xyxy(t)), t)
    cats = CategoryMap(list(reversed(CATS)))
    assert [cats.to_label(c["id"]) for c in CATS] == [1, 2, 3]  # contiguous, sorted by id; 0 stays background
    assert [cats.to_cat_id(label) for label in (1, 2, 3)] == [3, 7, 11]
    for label in (0, 4):
        with pytest.raises(KeyError) as error:
            cats.to_cat_id(label)
        assert error.value.args == (f"label {label} is not a foreground label (1..3)",)


# ---- the loader ----------------------------------------------------------------------------------------------------
def test_loader_reads_polygons_rle_crowd_and_empty_images(coco_root) -> None:
    val = CocoInstances(coco_root / "val2017", coco_root / "annotations/instances_val2017.json")
    assert len(val) == 5  # evaluation keeps the image without annotations
    image, target = val[2]  # image 3: square, disc and the crowd region
    assert image.shape == (3, 60, 84) and image.dtype == torch.float32 and image.max() <= 1
    assert target["labels"].tolist() == [1, 2, 2] and target["iscrowd"].tolist() == [0, 0, 1]
    coco = COCO(str(coco_root / "annotations/instances_val2017.json"))
    expected = xywh_to_xyxy(np.array([a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=3))], np.float32))
    np.testing.assert_allclose(target["boxes"].numpy(), expected)
    # masks decoded from polygon, compressed RLE and uncompressed RLE: each box is its mask's extent
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = np.nonzero(mask.numpy())
        assert abs(xs.min() - box[0]) <= 1 and abs(ys.min() - box[1]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
    assert target["masks"][2].sum() == 12 * 16
    empty = val[4][1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 60, 92)

    train = CocoInstances(coco_root / "train2017", coco_root / "annotations/instances_train2017.json", train=True)
    assert len(train) == 4  # the empty image is dropped for training (filter_empty)
    assert all(train[i][1]["iscrowd"].sum() == 0 for i in range(4))  # crowd regions ignored in training
    kept = CocoInstances(coco_root / "train2017", coco_root / "annotations/instances_train2017.json", train=True,
                         filter_empty=False)
    assert len(kept) == 5
    jittered = CocoInstances(coco_root / "train2017", coco_root / "annotations/instances_train2017.json", train=True,
                             filter_empty=False, transform=train_transform(64))
    image, target = jittered[4]  # an image without objects goes through the augmentation too
    assert image.shape == (3, 64, 64) and target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 64, 64)


def test_large_scale_jitter_moves_boxes_and_masks_together(coco_root) -> None:
    data = CocoInstances(coco_root / "train2017", coco_root / "annotations/instances_train2017.json",
                         transform=train_transform(64, (0.3, 2.0), hflip=0.5), train=True)
    seen = 0
    for seed in range(12):
        np.random.seed(seed)
        random.seed(seed)
        image, target = data[seed % len(data)]
        assert image.shape == (3, 64, 64)
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = np.nonzero(mask.numpy())  # every box is exactly its (scaled, cropped, flipped) mask's extent
            assert len(xs) and box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            seen += 1
        # the masks moved with the image: under each mask lies its object's colour (red square, green disc, blue
        # triangle = labels 1, 2, 3)
        for label, mask in zip(target["labels"], target["masks"]):
            if mask.sum() >= 20:
                colour = image[:, mask.bool()].mean(1)
                assert colour.argmax().item() == label.item() - 1, (seed, label, colour)
    assert seen > 10


def test_bad_annotations_are_counted_and_missing_files_are_clear_errors(tmp_path, caplog) -> None:
    root = write_tiny_coco(tmp_path / "coco", extra_anns=[
        {"id": 900, "image_id": 99, "category_id": 3, "iscrowd": 0, "bbox": [1, 1, 5, 5],
         "segmentation": [[1, 1, 6, 1, 6, 6]], "area": 10},  # an image that does not exist
        {"id": 901, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [5, 5, 0, 8],
         "segmentation": [[5, 5, 5, 13, 5, 9]], "area": 0},  # a degenerate (zero-width) box
        {"id": 902, "image_id": 1, "category_id": 42, "iscrowd": 0, "bbox": [1, 1, 5, 5],
         "segmentation": [[1, 1, 6, 1, 6, 6]], "area": 10},  # an unknown category
    ])
    with caplog.at_level("WARNING"):
        data = CocoInstances(root / "val2017", root / "annotations/instances_val2017.json")
    assert data.skipped["for images not in the file"] == 1
    assert data.skipped["with a degenerate box"] == 1
    assert data.skipped["with an unknown category"] == 1
    assert "skipped annotations" in caplog.text
    assert [len(data[i][1]["boxes"]) for i in range(len(data))] == [2, 3, 3, 3, 0]  # every item still loads

    dm = CocoDataModule(root=str(root), num_classes=3, img_size=64, batch_size=2, num_workers=0)
    (root / "annotations/instances_train2017.json").unlink()
    with pytest.raises(DatasetError, match=r"instances_train2017\.json does not exist"):
        dm.setup("fit")
    (root / "val2017" / f"{2:012d}.jpg").unlink()
    with pytest.raises(DatasetError, match=r"not in .*val2017.*000000000002\.jpg"):
        CocoInstances(root / "val2017", root / "annotations/instances_val2017.json")
    with pytest.raises(DatasetError, match="data.num_classes=3"):
        CocoDataModule(root=str(write_tiny_coco(tmp_path / "c2")), num_classes=80, img_size=64,
                       batch_size=2, num_workers=0).setup("validate")


def test_summary_counts_crowds_box_only_annotations_and_rles_of_another_size(tmp_path) -> None:
    h, w = 60, 76  # image 1 of write_tiny_coco
    other_size = _rle(np.ones((h + 1, w), np.uint8))
    root = write_tiny_coco(tmp_path / "coco", extra_anns=[
        {"id": 900, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 12.5,
         "segmentation": [[1, 1, 6, 1, 6, 6]]},  # no iscrowd key: not a crowd
        {"id": 901, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [0, 0, w, h + 1], "area": 4636.0,
         "segmentation": other_size},  # an RLE one row taller than its image
    ])
    ann_file = root / "annotations/instances_val2017.json"
    # write_tiny_coco: images 1-4 have a square and a disc, 2 and 4 a triangle, 3 a crowd region, 5 nothing
    assert CocoInstances(root / "val2017", ann_file).summary() == {
        "images": 5, "categories": 3, "annotations": 8 + 2 + 1 + 2, "crowd": 1,
        "box-only (no usable segmentation)": 0, "RLE masks of another size than their image": 1,
        "images without annotation": 1, "skipped with a mask of another size than its image": 1,
    }
    data = json.loads(ann_file.read_text())
    data["annotations"].append({"id": 902, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [0, 0, w, h],
                                "area": 4560.0, "segmentation": {"counts": other_size["counts"]}})
    ann_file.write_text(json.dumps(data))
    summary = CocoInstances(root / "val2017", ann_file).summary()  # an RLE without its size is no usable mask
    assert summary["box-only (no usable segmentation)"] == 1 and summary["annotations"] == 14
    assert summary["RLE masks of another size than their image"] == 1  # counted once, as box-only


# ---- evaluation: ground truth as predictions -----------------------------------------------------------------------
class _Oracle(torch.nn.Module):
    """A 'detector' that returns whatever predictions the test queued."""

    def __init__(self, backbone=None, num_classes=None):
        super().__init__()
        self.queue = []
        self.dummy = torch.nn.Linear(1, 1)

    def forward(self, images, targets=None):
        return self.queue.pop(0)


def _gt_as_predictions(target: dict) -> dict:
    keep = target["iscrowd"] == 0
    n = int(keep.sum())
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep], "scores": torch.ones(n),
            "masks": target["masks"][keep][:, None].float()}


def test_ground_truth_as_predictions_scores_ap_one(coco_root, tmp_path) -> None:
    val = CocoInstances(coco_root / "val2017", coco_root / "annotations/instances_val2017.json")
    task = DetectionTask(net=torch.nn.Identity(), detector=_Oracle, num_classes=3, draw_predictions=False)
    batch = collate_detection([val[i] for i in range(len(val))])
    task.net.queue.append([_gt_as_predictions(t) for t in batch[1]])
    task._eval_step("val", batch, batch_idx=1)
    out = task.metrics["val"].compute()
    for key in ("bbox_map", "bbox_map_50", "bbox_map_75", "segm_map", "segm_map_50", "segm_map_75"):
        assert out[key].item() == pytest.approx(1.0), key
    # a wrong label on one box must cost AP: the metric is not trivially 1
    task.metrics["val"].reset()
    preds = [_gt_as_predictions(t) for t in batch[1]]
    preds[0]["labels"] = torch.full_like(preds[0]["labels"], 3)
    task.net.queue.append(preds)
    task._eval_step("val", batch, batch_idx=1)
    assert task.metrics["val"].compute()["bbox_map"] < 0.9

    # the results-json path: original category ids, xywh boxes, RLE masks, scored by COCO's own evaluator
    to_cat = val.categories.to_cat_id
    results = [r for t in batch[1] for r in to_coco_results(_gt_as_predictions(t), int(t["image_id"]), to_cat)]
    assert {r["category_id"] for r in results} == {3, 7, 11}
    gt = COCO(str(coco_root / "annotations/instances_val2017.json"))
    (tmp_path / "res.json").write_text(json.dumps(results))
    dt = gt.loadRes(str(tmp_path / "res.json"))
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0), iou_type


# ---- the detector --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector() -> VimRCNN:
    torch.manual_seed(0)
    vim = create_model("vim_tiny_patch16_224", num_classes=3, img_size=64, embed_dim=32, depth=2, d_state=4)
    return VimRCNN(vim, num_classes=3, img_size=64, out_channels=16, anchor_sizes=(8, 16, 32, 64, 128),
                       representation_size=32, mask_channels=16, mask_convs=1)


def test_pyramid_levels_and_predictions_in_original_pixels(detector) -> None:
    feats = detector.backbone(torch.randn(2, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(f.shape[1] == detector.backbone.out_channels == 16 for f in feats.values())
    assert isinstance(detector.backbone.body.head, torch.nn.Identity)  # reset_classifier(0)
    images = [torch.rand(3, 50, 70), torch.rand(3, 90, 40)]  # longest side resized to 64, padded to 64x64
    batched, _ = detector.transform(images)
    assert batched.tensors.shape[-2:] == (64, 64) and batched.image_sizes[0] == (45, 64)
    detector.eval()
    detector.roi_heads.score_thresh = 0.0  # an untrained net: keep whatever it finds
    with torch.no_grad():
        out = detector(images)
    assert out[0]["masks"].shape[-2:] == (50, 70) and out[1]["masks"].shape[-2:] == (90, 40)
    assert (out[0]["boxes"][:, 2] <= 70).all() and (out[1]["boxes"][:, 3] <= 90).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        VimRCNN(create_model("vim_tiny_patch16_224", embed_dim=32, depth=2), num_classes=3, img_size=80)


def test_masks_false_is_faster_rcnn_and_masks_true_has_mask_rcnn_keys() -> None:
    """The same model as torchvision's MaskRCNN / FasterRCNN assembled from the same parts: the same state-dict keys
    and shapes (checkpoints of either kind load), and no mask branch, loss or output without masks."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    def vim():
        torch.manual_seed(0)
        return create_model("vim_tiny_patch16_224", num_classes=3, img_size=64, embed_dim=32, depth=2, d_state=4)

    anchors = (8, 16, 32, 64, 128)
    kw = dict(img_size=64, out_channels=16, anchor_sizes=anchors, representation_size=32, mask_channels=16,
              mask_convs=1)
    levels = ["0", "1", "2", "3"]
    parts = dict(num_classes=None, rpn_anchor_generator=AnchorGenerator(tuple((a,) for a in anchors),
                                                                       ((0.5, 1.0, 2.0),) * 5),
                 box_roi_pool=MultiScaleRoIAlign(levels, 7, 2), box_head=TwoMLPHead(16 * 49, 32),
                 box_predictor=FastRCNNPredictor(32, 4))
    mask_parts = dict(mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2), mask_head=MaskRCNNHeads(16, [16], 1),
                      mask_predictor=MaskRCNNPredictor(16, 16, 4))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    for masks, reference in ((True, MaskRCNN(VimPyramidBackbone(vim(), 16), **parts, **mask_parts)),
                             (False, FasterRCNN(VimPyramidBackbone(vim(), 16), **parts))):
        model = VimRCNN(vim(), num_classes=3, masks=masks, **kw)
        assert shapes(model) == shapes(reference), masks
        assert any(k.startswith("roi_heads.mask_") for k in shapes(model)) is masks
        model.train()
        target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
        if masks:
            target["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
            target["masks"][0, 4:40, 4:30] = 1
        losses = model([torch.rand(3, 64, 64)], [target])
        assert ("loss_mask" in losses) is masks and "loss_box_reg" in losses
        model.eval()
        model.roi_heads.score_thresh = 0.0
        with torch.no_grad():
            (pred,) = model([torch.rand(3, 64, 64)])
        assert ("masks" in pred) is masks and len(pred["boxes"]) > 0


def test_box_only_data_trains_and_evaluates_boxes_through_train_py(tmp_path, data_dir) -> None:
    root = write_shapes_coco(tmp_path / "boxes", num_train=8, num_val=4, box_only=True)
    cfg = compose_config("train.yaml", ["experiment=shapes_det", f"data.root={root}", "task.masks=false",
                                        "data.img_size=64", "data.batch_size=2", "task.write_results=true",
                                        "model.embed_dim=32", "model.depth=2", *SMALL_HEADS])
    assert cfg.data.masks is False and cfg.task.detector.masks is False
    cfg = make_fast(cfg, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.data.root = str(root)
        cfg.callbacks.pop("lr_monitor", None)
    metrics = run_train(cfg)
    assert "train/loss_mask_epoch" not in metrics and np.isfinite(float(metrics["train/loss_box_reg_epoch"]))
    assert 0.0 <= float(metrics["val/bbox_mAP"]) <= 1.0 and 0.0 <= float(metrics["test/bbox_mAP_50"]) <= 1.0
    assert not [k for k in metrics if "segm" in k]
    results = json.loads((Path(cfg.paths.output_dir) / "coco_results_test.json").read_text())
    assert all("segmentation" not in r and len(r["bbox"]) == 4 for r in results)


def test_layer_decay_groups_prefix_the_backbone(detector) -> None:
    names = dict(detector.named_parameters())
    assert detector.no_weight_decay() and detector.no_weight_decay() <= set(names)
    groups = build_param_groups(detector, weight_decay=0.1, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    head = scale_of[id(names["roi_heads.box_predictor.cls_score.weight"])]
    fpn = scale_of[id(names["backbone.fpn.stages.0.0.weight"])]
    stem = scale_of[id(names["backbone.body.patch_embed.proj.weight"])]
    block1 = scale_of[id(names["backbone.body.layers.1.mixer.in_proj.weight"])]
    assert head == fpn == 1.0 and stem < block1 < 1.0
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(names["backbone.body.pos_embed"])] == 0.0 and decay_of[id(names["rpn.head.conv.0.0.weight"])] == 0.1


def test_shapes_det_is_written_once_as_a_coco_layout(tmp_path) -> None:
    root = write_shapes_coco(tmp_path / "shapes", num_train=12, num_val=6)
    stamp = (root / "annotations/instances_val2017.json").stat().st_mtime_ns
    assert write_shapes_coco(root, num_train=12, num_val=6) == root
    assert (root / "annotations/instances_val2017.json").stat().st_mtime_ns == stamp  # not rewritten
    assert not list(tmp_path.glob(".shapes-*")), "temporary folder left behind"
    anns = json.loads((root / "annotations/instances_train2017.json").read_text())
    segs = [a["segmentation"] for a in anns["annotations"]]
    assert any(isinstance(s, list) for s in segs) and any(isinstance(s, dict) for s in segs)
    assert {a["image_id"] for a in anns["annotations"]} < {im["id"] for im in anns["images"]}  # an empty image
    data = CocoInstances(root / "train2017", root / "annotations/instances_train2017.json")
    assert len(data) == 12 and sum(len(data[i][1]["boxes"]) for i in range(12)) == len(anns["annotations"])


# ---- end to end through src/train.py -------------------------------------------------------------------------------
def test_fit_and_test_through_train_py_on_a_coco_layout(coco_root, tmp_path, data_dir) -> None:
    cfg = compose_config("train.yaml", ["experiment=shapes_det", "data=coco", f"data.root={coco_root}", "data.num_classes=3",
                                        "data.img_size=64", "data.batch_size=2", "task.write_results=true",
                                        "model.embed_dim=32", "model.depth=2", *SMALL_HEADS])
    assert cfg.hydra.runtime.choices.recipe == "coco" and cfg.task.layer_decay == pytest.approx(0.837)
    cfg = make_fast(cfg, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.limit_val_batches = 3
        cfg.trainer.limit_test_batches = 3
        cfg.callbacks.pop("lr_monitor", None)  # make_fast removes the loggers, which LearningRateMonitor needs
    metrics = run_train(cfg)
    for key in ("train/loss", "train/loss_classifier", "train/loss_box_reg", "train/loss_mask",
                "train/loss_objectness", "train/loss_rpn_box_reg"):
        assert np.isfinite(float(metrics[f"{key}_epoch"])), key
    for key in ("val/bbox_mAP", "val/bbox_mAP_50", "val/segm_mAP_75", "val/bbox_mAP_best", "test/segm_mAP"):
        assert 0.0 <= float(metrics[key]) <= 1.0, key  # COCO's -1 ("no ground truth") would be a broken split
    out = Path(cfg.paths.output_dir)
    assert list((out / "predictions").glob("epoch_*.png"))
    results = json.loads((out / "coco_results_test.json").read_text())
    assert {r["category_id"] for r in results} <= {3, 7, 11}
    assert all(len(r["bbox"]) == 4 and "counts" in r["segmentation"] for r in results)
    # the task's and datamodule's hparams are plain Python (no OmegaConf nodes, no partials): what a
    # torch.load(weights_only=True) accepts
    ckpt = torch.load(next((out / "checkpoints").glob("epoch_*.ckpt")), map_location="cpu", weights_only=True)

    def plain(obj) -> bool:
        if isinstance(obj, dict):
            return all(isinstance(k, str) and plain(v) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return all(plain(v) for v in obj)
        return obj is None or isinstance(obj, (bool, int, float, str))

    assert plain(ckpt["hyper_parameters"]) and plain(ckpt["datamodule_hyper_parameters"])
    assert "detector" not in ckpt["hyper_parameters"]


def test_shapes_det_experiment_is_the_embedded_shapes() -> None:
    cfg = compose_config("train.yaml", ["experiment=shapes_det"])
    choices = cfg.hydra.runtime.choices
    assert (choices.data, choices.model, choices.recipe) == ("shapes_det", "vim_det_shapes", "shapes_det")
    assert cfg.optimized_metric == "val/bbox_mAP_best" and cfg.task.monitor == "val/bbox_mAP"
    assert cfg.task.schedule.kind == "step" and list(cfg.task.schedule.milestones) == [0.89, 0.96]
    cfg = compose_config("train.yaml", ["experiment=coco_mask_rcnn_vim_tiny"])
    assert cfg.data._target_.endswith("CocoDataModule") and cfg.task.layer_decay == pytest.approx(0.837)
    assert cfg.data.img_size == 1024 and list(cfg.data.scale_range) == [0.1, 2.0]



def test_box_conversions_give_float32_and_leave_their_input_alone() -> None:
    from vision_mamba.data.coco import masks_to_boxes, xyxy_to_xywh

    boxes = np.array([[1.0, 2.0, 4.0, 7.0]], np.float32)
    out = xyxy_to_xywh(boxes)
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 2.0, 3.0, 5.0]]
    assert boxes.tolist() == [[1.0, 2.0, 4.0, 7.0]]
    assert xyxy_to_xywh(np.array([[1, 2, 4, 7]])).dtype == np.float32
    tensor = torch.tensor([[1.0, 2.0, 4.0, 7.0]])
    assert xyxy_to_xywh(tensor).tolist() == [[1.0, 2.0, 3.0, 5.0]] and tensor.tolist() == [[1.0, 2.0, 4.0, 7.0]]
    masks = np.zeros((2, 6, 8), np.uint8)
    masks[0, 1:3, 2:5] = 1  # rows 1-2, columns 2-4 -> pixel-edge box (2, 1, 5, 3); mask 1 empty -> zeros
    got = masks_to_boxes(masks)
    assert got.dtype == np.float32 and got.tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


# ---- the embedded shapes: what is written is what was drawn ----------------------------------------------------------
def test_uncompressed_rle_counts_by_hand_and_decoded_by_pycocotools() -> None:
    from vision_mamba.data.shapes_det import _uncompressed_rle

    mask = np.zeros((3, 4), np.uint8)
    mask[0, 0] = mask[1, 2] = 1
    # column by column: 1 0 0 | 0 0 0 | 0 1 0 | 0 0 0 -> COCO's counts start with a (here empty) run of zeros
    assert _uncompressed_rle(mask) == {"size": [3, 4], "counts": [0, 1, 6, 1, 4]}
    mask = np.zeros((3, 4), np.uint8)
    mask[1, 0] = mask[2, 3] = 1  # 0 1 0 | 0 0 0 | 0 0 0 | 0 0 1: ends on a run of ones
    assert _uncompressed_rle(mask) == {"size": [3, 4], "counts": [1, 1, 9, 1]}
    assert _uncompressed_rle(np.zeros((2, 5), np.uint8))["counts"] == [10]
    assert _uncompressed_rle(np.ones((2, 5), np.uint8))["counts"] == [0, 10]
    rng = np.random.default_rng(0)
    for h, w in ((7, 11), (12, 5), (1, 9)):
        mask = (rng.random((h, w)) < 0.4).astype(np.uint8)
        rle = _uncompressed_rle(mask)
        assert all(type(c) is int for c in rle["counts"])  # plain ints: what json writes
        decoded = mask_utils.decode(mask_utils.frPyObjects(json.loads(json.dumps(rle)), h, w))
        assert np.array_equal(decoded, mask), (h, w)


def test_shapes_annotations_match_the_drawn_pixels(tmp_path) -> None:
    """Every annotation's mask is exactly the pixels of one drawn colour (RLE) or their outline (polygon), its box and
    area are the mask's, its category is the shape's (polygons: 24, 4, 3 corners); crowds are uncompressed RLE."""
    from vision_mamba.data.shapes_det import draw_split

    data = draw_split(tmp_path, "s", 24, np.random.default_rng(1), crowd_prob=0.5)
    full = draw_split(tmp_path / "again", "s", 24, np.random.default_rng(1), crowd_prob=0.5, box_only=False)
    boxes_only = draw_split(tmp_path / "boxes", "s", 24, np.random.default_rng(1), crowd_prob=0.5, box_only=True)
    assert data == full  # box_only=False is the default
    assert boxes_only["images"] == data["images"] and boxes_only["annotations"] == [
        {k: v for k, v in a.items() if k != "segmentation"} for a in data["annotations"]]
    assert data["categories"] == [{"id": 2, "name": "circle", "supercategory": "shape"},
                                  {"id": 5, "name": "square", "supercategory": "shape"},
                                  {"id": 9, "name": "triangle", "supercategory": "shape"}]
    assert [im["id"] for im in data["images"]] == list(range(1, 25))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert 1 not in {a["image_id"] for a in data["annotations"]}  # the first image is empty
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    kinds = {"polygon": 0, "rle": 0, "crowd": 0}
    for im in data["images"]:
        assert im["file_name"] == f"{im['id']:06d}.png"
        pixels = np.asarray(Image.open(tmp_path / "s" / im["file_name"]))
        assert pixels.shape == (im["height"], im["width"], 3) and 96 <= min(pixels.shape[:2]) <= max(pixels.shape) <= 160
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=im["id"])):
            mask = coco.annToMask(ann).astype(bool)
            colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
            colour = colours[counts.argmax()]
            assert colour.min() >= 120  # shapes are bright, the background dark
            painted = (pixels == colour).all(-1)
            seg = ann["segmentation"]
            if ann["iscrowd"]:
                kinds["crowd"] += 1
                assert ann["category_id"] == 2 and isinstance(seg["counts"], list) and seg["size"] == list(pixels.shape[:2])
                assert np.array_equal(mask, painted), ann["id"]  # six small circles of one colour
            elif isinstance(seg, list):
                kinds["polygon"] += 1
                assert {24: 2, 4: 5, 3: 9}[len(seg[0]) // 2] == ann["category_id"]
                # pycocotools rasterises the polygon a little differently from PIL at the edge (small shapes: ~15%)
                assert (mask & painted).sum() / (mask | painted).sum() > 0.75
            else:
                kinds["rle"] += 1
                assert isinstance(seg["counts"], str) and seg["size"] == list(pixels.shape[:2])
                assert np.array_equal(mask, painted), ann["id"]
            ys, xs = np.nonzero(painted)  # box and area: those of the drawn pixels
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == painted.sum()
    assert min(kinds.values()) >= 2, kinds


def test_training_batches_are_shuffled_and_full_evaluation_keeps_the_file_order(coco_root) -> None:
    from torch.utils.data import RandomSampler, SequentialSampler

    dm = CocoDataModule(root=str(coco_root), num_classes=3, img_size=64, batch_size=3, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.collate_fn is collate_detection
    (images, _), = list(train)  # 4 images with objects in batches of 3: the odd one dropped
    assert [tuple(im.shape) for im in images] == [(3, 64, 64)] * 3  # jittered to the img_size square
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler)
        batches = list(loader)
        assert [len(images) for images, _ in batches] == [3, 2]  # every image, the empty one too, in id order
        assert [int(t["image_id"]) for _, targets in batches for t in targets] == [1, 2, 3, 4, 5]
        assert [tuple(im.shape) for images, _ in batches for im in images] == [(3, 60, 72 + 4 * i) for i in range(1, 6)]


def test_the_data_check_reads_box_only_files_and_skips_boxes_by_data_min_box_size(coco_root, tmp_path) -> None:
    anns = json.loads((coco_root / "annotations/instances_val2017.json").read_text())["annotations"]
    narrow = sum(min(a["bbox"][2:]) < 21 for a in anns)  # the triangles (20 high) and the crowd region (16 x 12)
    assert narrow == 3
    plans = CocoDataModule(root=str(coco_root), num_classes=3, min_box_size=21).check_plan()
    assert [p.summary.get("skipped with a degenerate box") for p in plans] == [narrow, narrow]
    # a box-only file is checked (its images and counts), not refused as it is for training masks
    root = write_shapes_coco(tmp_path / "boxes", num_train=3, num_val=2, box_only=True)
    plans = CocoDataModule(root=str(root), num_classes=3).check_plan()
    for plan, split in zip(plans, ("train2017", "val2017")):
        data = json.loads((root / f"annotations/instances_{split}.json").read_text())
        assert plan.name == split and len(plan.items) == len(data["images"])
        assert plan.summary["box-only (no usable segmentation)"] == plan.summary["annotations"] == len(data["annotations"])


def test_shapes_det_datamodule_writes_the_sizes_it_is_given(tmp_path) -> None:
    from vision_mamba.data.shapes_det import ShapesDetDataModule

    dm = ShapesDetDataModule(root=str(tmp_path / "shapes"), num_train=5, num_val=3, batch_size=2, num_workers=0)
    dm.prepare_data()
    for split, n in (("train2017", 5), ("val2017", 3)):
        assert len(json.loads((tmp_path / "shapes" / f"annotations/instances_{split}.json").read_text())["images"]) == n
        assert len(list((tmp_path / "shapes" / split).glob("*.png"))) == n


def test_unusable_polygons_are_skipped_and_counted(tmp_path) -> None:
    bad = [[], [[1, 1, 20, 1]], [[1, 1, 20, 1, 20, 20, 3]], [1, 1, 20, 1, 20, 20]]  # none, 2 points, odd, not nested
    root = write_tiny_coco(tmp_path / "coco", extra_anns=[
        {"id": 900 + i, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [1, 1, 19, 19], "area": 180,
         "segmentation": seg} for i, seg in enumerate(bad)])
    ann_file = root / "annotations/instances_val2017.json"
    data = CocoInstances(root / "val2017", ann_file)
    assert data.skipped["without a usable segmentation"] == len(bad) and len(data[0][1]["boxes"]) == 2
    assert len(CocoInstances(root / "val2017", ann_file, masks=False)[0][1]["boxes"]) == 2 + len(bad)  # boxes: kept


def test_a_size_that_disagrees_with_the_json_names_file_sizes_and_fix(tmp_path) -> None:
    from vision_mamba.data.coco import read_coco_image
    from vision_mamba.data.errors import SKIP_HINT, BadImageError

    Image.new("RGB", (7, 5)).save(tmp_path / "a.png")
    assert read_coco_image(tmp_path / "a.png", 7, 5, "x.json").shape == (5, 7, 3)
    with pytest.raises(BadImageError) as error:
        read_coco_image(tmp_path / "a.png", 5, 7, "instances_val2017.json")
    assert str(error.value) == (
        f"{tmp_path / 'a.png'} is 7x5 but its entry in instances_val2017.json says 5x7: fix width/height in the json "
        f"(annotations are in the stored pixel order: EXIF rotation is not applied), {SKIP_HINT}")


def test_augmentation_drops_boxes_under_a_pixel_and_takes_boxes_from_the_masks(coco_root) -> None:
    """Through an identity transform with the training box settings: what is left is decided by the boxes (box-only)
    or by the masks (a box is its mask's extent; an emptied mask drops its instance)."""
    import albumentations as A

    data = CocoInstances(coco_root / "val2017", coco_root / "annotations/instances_val2017.json")
    data.transform = A.Compose([A.NoOp()], bbox_params=A.BboxParams(
        format="pascal_voc", label_fields=["labels", "index"], min_visibility=0.0, clip=True))
    image = np.zeros((20, 30, 3), np.uint8)
    boxes = np.array([[0, 0, 0.5, 10], [5, 0, 5.5, 10], [0, 5, 10, 5.5],  # under a pixel wide or high
                      [0.5, 0, 1.5, 10], [2, 2, 12, 3], [2, 2, 12, 12]], np.float32)  # one pixel, or more
    labels, iscrowd = np.arange(1, 7), np.array([0, 0, 0, 0, 1, 0])
    out_image, out_boxes, out_labels, out_crowd, out_masks = data._augment(image, boxes, labels, iscrowd, None)
    assert out_image.shape == (20, 30, 3) and out_masks is None
    np.testing.assert_allclose(out_boxes, boxes[3:], atol=1e-5)
    assert out_boxes.dtype == np.float32 and out_labels.tolist() == [4, 5, 6] and out_crowd.tolist() == [0, 1, 0]

    masks = np.zeros((3, 20, 30), np.uint8)
    masks[0, 2:8, 3] = 1  # one column: box (3, 2, 4, 8)
    masks[2, 10:14, 20:26] = 1  # mask 1 is empty: its instance goes, whatever its box says
    loose = np.array([[2, 1, 6, 9], [10, 10, 15, 15], [19, 9, 27, 15]], np.float32)
    _, out_boxes, out_labels, out_crowd, out_masks = data._augment(image, loose, labels[:3], iscrowd[:3], masks)
    assert out_boxes.tolist() == [[3, 2, 4, 8], [20, 10, 26, 14]] and out_labels.tolist() == [1, 3]
    assert np.array_equal(out_masks, masks[[0, 2]]) and out_masks.dtype == np.uint8
    _, out_boxes, _, _, out_masks = data._augment(image, np.zeros((0, 4), np.float32), labels[:0], iscrowd[:0],
                                                  np.zeros((0, 20, 30), np.uint8))
    assert out_boxes.shape == (0, 4) and out_masks.shape == (0, 20, 30) and out_masks.dtype == np.uint8
