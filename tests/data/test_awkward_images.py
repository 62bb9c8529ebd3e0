"""The three loaders on awkward real-world files (tests/data/awkward.py): RGB of the right size and pixels for every
image mode, EXIF orientation ignored consistently (masks and boxes stay aligned), masks of any index mode."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from data.awkward import write_awkward_ade20k, write_awkward_coco, write_awkward_images
from vision_mamba.data.ade20k import IGNORE_INDEX, ADE20KDataModule
from vision_mamba.data.coco import CocoInstances
from vision_mamba.data.imagenet import ImageFolderDataModule


def assert_pixels(got: np.ndarray, item, kind: str) -> None:
    assert got.dtype == np.uint8 and got.shape == item.expected.shape, (kind, got.shape, item.expected.shape)
    err = np.abs(got.astype(int) - item.expected.astype(int)).max()
    assert err <= item.atol, (kind, err)


def test_imagenet_loader(tmp_path) -> None:
    awkward = {**write_awkward_images(tmp_path / "train" / "n00000001"),
               **{f"b_{k}": v for k, v in write_awkward_images(tmp_path / "train" / "n00000002").items()}}
    for wnid in ("n00000001", "n00000002"):
        write_awkward_images(tmp_path / "val" / wnid, size=(32, 16))
    dm = ImageFolderDataModule(root=str(tmp_path), num_classes=2, batch_size=4, num_workers=0)
    dm.setup("fit")
    data = dm.data_train
    data.transform = None  # the decoded image itself
    by_path = {str(item.path): (kind, item) for kind, item in awkward.items()}
    assert len(data) == len(by_path)
    for i, (path, target) in enumerate(data.samples):
        kind, item = by_path[path]
        image, label = data[i]
        assert image.mode == "RGB" and label == target == (1 if kind.startswith("b_") else 0)
        assert_pixels(np.asarray(image), item, kind)
    # and through the recipe's transforms: every kind gives the configured tensor
    dm.data_train.transform, evaluate = dm.build_transform(True), dm.data_val
    for dataset in (dm.data_train, evaluate):
        for i in range(len(dataset)):
            x, _ = dataset[i]
            assert x.shape == (3, 224, 224) and torch.isfinite(x).all()


def test_ade20k_loader(tmp_path) -> None:
    expected = write_awkward_ade20k(tmp_path, num_classes=5)
    assert {e["mode"] for e in expected.values()} == {"L", "P", "I;16"}
    dm = ADE20KDataModule(root=str(tmp_path), num_classes=5, img_size=32, scale=(128, 32), batch_size=2,
                          num_workers=0)
    dm.setup("fit")
    for split, data in (("training", dm.data_train), ("validation", dm.data_val)):
        for i, (image_path, _) in enumerate(data.pairs):
            e = expected[f"{split}/{image_path.stem}"]
            image, mask = data.read(i)
            assert_pixels(image, e["image"], e["kind"])
            # file label k -> class k - 1, 0 ("other") -> ignored; a palette mask gives its indices, not colours
            assert np.array_equal(mask, np.where(e["labels"] == 0, IGNORE_INDEX, e["labels"].astype(np.int64) - 1))
            if e["kind"] == "exif_rotated":  # stored order: the white half is where labels 0..2 are (left)
                left = e["labels"] < 3
                assert image[left].min() > 200 and image[~left].max() < 55
    for i in range(len(dm.data_val)):
        image, mask = dm.data_val[i]  # eval: the image resized, the mask at the annotation's size
        h, w = dm.data_val.read(i)[1].shape
        assert tuple(mask.shape) == (h, w) and image.shape[0] == 3
    for i in range(len(dm.data_train)):
        image, mask = dm.data_train[i]
        assert tuple(image.shape) == (3, 32, 32) and tuple(mask.shape) == (32, 32)


def test_coco_loader(tmp_path, caplog) -> None:
    expected = write_awkward_coco(tmp_path, "val2017")
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    odd = next(e for e in data["images"] if e["file_name"] == "odd.png")
    wrong = dict(data["annotations"][0], id=999, image_id=odd["id"])
    wrong["segmentation"] = dict(wrong["segmentation"], size=[odd["height"] + 1, odd["width"]])
    data["annotations"].append(wrong)  # an RLE drawn for another size: skipped and counted, not a crash
    ann_file.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        val = CocoInstances(tmp_path / "val2017", ann_file)
    assert val.skipped["with a mask of another size than its image"] == 1
    assert "1 with a mask of another size than its image" in caplog.text
    for kind, e in expected.items():
        image, target = val[val.ids.index(e["id"])]
        h, w = e["image"].expected.shape[:2]
        assert_pixels((image.permute(1, 2, 0) * 255).round().byte().numpy(), e["image"], kind)
        assert torch.equal(target["masks"][0], torch.from_numpy(e["mask"]))
        assert target["boxes"][0].tolist() == [0, 0, max(1, w // 2), h]
        if e["crowd"] is not None:  # the uncompressed-RLE crowd region, decoded in place
            assert target["iscrowd"].tolist() == [0, 1]
            assert torch.equal(target["masks"][1], torch.from_numpy(e["crowd"]))
        if kind == "exif_rotated":  # stored order: the object's mask covers the white half
            on = target["masks"][0].bool()
            assert image[:, on].min() > 0.8 and image[:, ~on].max() < 0.2


@pytest.mark.parametrize("masks", [True, False])
def test_coco_box_only_reading_skips_the_masks(tmp_path, masks: bool) -> None:
    write_awkward_coco(tmp_path, "val2017")
    val = CocoInstances(tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json", masks=masks)
    _, target = val[0]
    assert ("masks" in target) is masks and len(target["boxes"]) == 1
