"""Data mistakes found before anything runs, each one DatasetError line that says what is wrong and how to fix it."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_train import write_tiny_imagenet
from test_user_errors import assert_short_error, run

from data.awkward import write_awkward_ade20k
from vision_mamba.data.ade20k import ADE20KDataModule
from vision_mamba.data.coco import CocoDataModule, CocoInstances
from vision_mamba.data.digits import DigitsDataModule
from vision_mamba.data.errors import DatasetError
from vision_mamba.data.imagenet import ImageFolderDataModule
from vision_mamba.data.shapes_det import write_shapes_coco
from vision_mamba.data.shapes_seg import ShapesSegDataModule

DATAMODULES = [ImageFolderDataModule, ADE20KDataModule, CocoDataModule, DigitsDataModule, ShapesSegDataModule]


@pytest.mark.parametrize("cls", DATAMODULES, ids=lambda c: c.__name__)
def test_batch_sizes_and_workers_are_checked_when_the_datamodule_is_built(cls) -> None:
    for batch in (0, -8):
        with pytest.raises(DatasetError, match=f"data.batch_size={batch}: a batch size must be a positive number"):
            cls(root="/x", batch_size=batch)
    with pytest.raises(DatasetError, match=r"data.num_workers=-1: the number of loader worker processes must be 0"):
        cls(root="/x", num_workers=-1)
    with pytest.raises(DatasetError, match="data.bad_images=sometimes is not an option: use error .* or skip"):
        cls(root="/x", bad_images="sometimes")
    eval_batch = {ADE20KDataModule: "val_batch_size", ShapesSegDataModule: "val_batch_size",
                  CocoDataModule: "eval_batch_size"}.get(cls)
    if eval_batch:
        with pytest.raises(DatasetError, match=f"data.{eval_batch}=0: a batch size must be a positive number"):
            cls(root="/x", **{eval_batch: 0})


def test_a_training_split_smaller_than_the_global_batch_says_both_numbers(tmp_path) -> None:
    root = write_tiny_imagenet(tmp_path / "imagenet")  # 3 classes x 6 training images
    with pytest.raises(DatasetError, match=r"train has 18 training samples, fewer than one global batch "
                                           r"\(data.batch_size=32\): .* set data.batch_size=18 or less"):
        ImageFolderDataModule(root=str(root), num_classes=3, batch_size=32).setup("fit")
    ImageFolderDataModule(root=str(root), num_classes=3, batch_size=18).setup("fit")
    # timm's RepeatAugSampler draws whole multiples of 256 images an epoch: 256 of 300, less than a batch of 280
    big = write_tiny_imagenet(tmp_path / "big", per_class=(100, 1))
    dm = ImageFolderDataModule(root=str(big), num_classes=3, batch_size=280, num_workers=0, repeated_aug=True)
    dm.setup("fit")
    with pytest.raises(DatasetError) as caught:
        dm.train_dataloader()
    assert str(caught.value) == (
        "data.repeated_aug=true draws 256 of the 300 training images per epoch (whole multiples of 256), fewer than "
        "one global batch (data.batch_size=280): set data.repeated_aug=false or data.batch_size=256 or less")
    dm = ImageFolderDataModule(root=str(big), num_classes=3, batch_size=256, num_workers=0, repeated_aug=True)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1  # exactly one batch of 256
    write_awkward_ade20k(tmp_path / "ade")  # 15 training pairs
    with pytest.raises(DatasetError, match=r"images/training has 15 training samples, fewer than one global batch "
                                           r"\(data.batch_size=16\)"):
        ADE20KDataModule(root=str(tmp_path / "ade"), num_classes=5).setup("fit")
    coco = write_shapes_coco(tmp_path / "coco", num_train=5, num_val=3)  # image 0 has no object: 4 to train on
    with pytest.raises(DatasetError, match=r"instances_train2017.json \(images with an annotation\) has 4 training "
                                           r"samples, fewer than one global batch \(data.batch_size=8\)"):
        CocoDataModule(root=str(coco), num_classes=3, batch_size=8).setup("fit")


def test_train_and_val_with_different_classes_name_them(tmp_path) -> None:
    root = write_tiny_imagenet(tmp_path / "imagenet")
    shutil.move(root / "val" / "n01484850", root / "val" / "n09999999")
    for num_classes in (3, 4, None):  # whatever data.num_classes says, the differing folders are named
        with pytest.raises(DatasetError) as caught:
            ImageFolderDataModule(root=str(root), num_classes=num_classes, batch_size=2).setup("fit")
        assert str(caught.value) == (
            f"the class folders of {root / 'train'} (3) and {root / 'val'} (3) differ: only in train/: n01484850; only "
            "in val/: n09999999. Both splits need the same class folders (labels are the sorted folder names): add or "
            "remove these")
    shutil.move(root / "val" / "n09999999", root / "val" / "n01484850")
    with pytest.raises(DatasetError, match=r"train has 3 class folders but data.num_classes=4: set "
                                           r"data.num_classes=3 or fix the folder"):
        ImageFolderDataModule(root=str(root), num_classes=4, batch_size=2).setup("fit")
    for extra in range(12):
        (root / "train" / f"n1{extra:07d}").mkdir()
        (root / "train" / f"n1{extra:07d}" / "a.JPEG").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"only in train/: n10000000, .*, n10000009 and 2 more; only in val/: none"):
        ImageFolderDataModule(root=str(root), num_classes=None, batch_size=2).setup("fit")


def write_coco_variant(root: Path, split: str, keep) -> Path:
    """Rewrite one split's annotations, keeping those for which ``keep(ann)`` holds."""
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if keep(a)]
    path.write_text(json.dumps(data))
    return path


def test_a_coco_eval_split_without_usable_annotation_is_an_error(tmp_path) -> None:
    root = write_shapes_coco(tmp_path / "coco", num_train=6, num_val=4)
    write_coco_variant(root, "val2017", lambda a: a["iscrowd"])  # crowd regions only: AP would be -1
    for stage in ("fit", "validate"):
        with pytest.raises(DatasetError, match=r"instances_val2017.json has no usable \(non-crowd\) annotation to "
                                               r"evaluate against: COCO AP would be -1"):
            CocoDataModule(root=str(root), num_classes=3, batch_size=2).setup(stage)


def test_a_box_only_coco_file_says_so_and_trains_boxes_with_masks_false(tmp_path) -> None:
    root = write_shapes_coco(tmp_path / "boxes", num_train=6, num_val=4, box_only=True)
    anns = json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]
    assert anns and not any("segmentation" in a for a in anns)
    with pytest.raises(DatasetError, match=r"instances_val2017.json is a box-only file: none of its \d+ annotations "
                                           r"has a `segmentation` .* pass task.masks=false"):
        CocoDataModule(root=str(root), num_classes=3, batch_size=2).setup("fit")
    dm = CocoDataModule(root=str(root), num_classes=3, batch_size=2, masks=False)
    dm.setup("fit")
    image, target = dm.data_train[0]
    assert set(target) == {"boxes", "labels", "iscrowd", "image_id", "orig_size"} and len(target["boxes"])
    # the same boxes as the full variant's (the writer draws the same shapes from the same seed)
    full = CocoInstances(write_shapes_coco(tmp_path / "full", num_train=6, num_val=4) / "val2017",
                         tmp_path / "full" / "annotations" / "instances_val2017.json")
    for i in range(len(full)):
        np.testing.assert_allclose(full[i][1]["boxes"], dm.data_val[i][1]["boxes"])


def test_an_up_front_data_error_through_train_py(tmp_path) -> None:
    """One `error:` line, exit status 2, before any training: a box-only file under task=detection (the config
    passes task.masks to the datamodule). The other checks raise the same DatasetError, printed the same way."""
    root = write_shapes_coco(tmp_path / "boxes", num_train=6, num_val=4, box_only=True)
    proc = run(["task=detection", "data=coco", f"data.root={root}", "data.num_classes=3", "extras.print_config=false",
                "~logger", "~callbacks.lr_monitor", "data.num_workers=0"], tmp_path)
    assert_short_error(proc, "is a box-only file", "pass task.masks=false")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert not list(tmp_path.glob("logs/train/runs/*/checkpoints/*.ckpt"))


def test_layout_errors_name_the_folder_or_file(tmp_path) -> None:
    """Every layout message of the three loaders (the ones not met above or in tests/test_user_errors.py)."""
    import torch

    from vision_mamba.data.ade20k import collate_same_size
    from vision_mamba.data.common import per_device_batch_size

    # ImageNet
    root = write_tiny_imagenet(tmp_path / "imagenet")
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetError, match=r"imagenet/val does not exist \(expected the ImageNet layout"):
        ImageFolderDataModule(root=str(root), num_classes=3, batch_size=2).setup("fit")
    (root / "val").mkdir()
    with pytest.raises(DatasetError, match=r"imagenet/val has no class folders \(expected the ImageNet layout"):
        ImageFolderDataModule(root=str(root), num_classes=3, batch_size=2).setup("validate")

    # ADE20K
    ade = tmp_path / "ade"
    ade.mkdir()
    with pytest.raises(DatasetError, match=r"data.root=.*ade holds no images/ and annotations/ folders"):
        ADE20KDataModule(root=str(ade), batch_size=2).setup("fit")
    write_awkward_ade20k(ade)
    base = ade / "ADEChallengeData2016"
    shutil.rmtree(base / "annotations" / "training")
    with pytest.raises(DatasetError, match=r"annotations/training does not exist \(expected the ADE20K release"):
        ADE20KDataModule(root=str(ade), batch_size=2).setup("fit")
    for f in (base / "images" / "validation").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"images/validation holds no images \(\*\.jpg\)"):
        ADE20KDataModule(root=str(ade), batch_size=2).setup("validate")
    with pytest.raises(DatasetError, match="validation images differ in size and cannot share a batch: set "
                                           "data.val_batch_size=1"):
        collate_same_size([(torch.zeros(3, 4, 4), torch.zeros(4, 4)), (torch.zeros(3, 4, 5), torch.zeros(4, 5))])

    # COCO
    with pytest.raises(DatasetError, match=r"data.root=.*nowhere does not exist \(expected the COCO layout"):
        CocoDataModule(root=str(tmp_path / "nowhere"), batch_size=2).setup("fit")
    with pytest.raises(DatasetError, match=r"data.root=.*nowhere does not exist \(expected the COCO layout"):
        CocoDataModule(root=str(tmp_path / "nowhere"), batch_size=2).check_plan()
    coco = write_shapes_coco(tmp_path / "coco", num_train=6, num_val=4)
    ann = coco / "annotations" / "instances_val2017.json"
    good = ann.read_text()

    def val_split():
        CocoInstances(coco / "val2017", ann)

    ann.write_text(good[:-10])
    with pytest.raises(DatasetError, match=r"instances_val2017.json is not valid JSON .*: re-download or regenerate"):
        val_split()
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"lacks \['categories'\]: it must be a COCO instances json"):
        val_split()
    ann.write_text(json.dumps({**json.loads(good), "categories": []}))
    with pytest.raises(DatasetError, match="instances_val2017.json defines no categories"):
        val_split()
    ann.write_text(json.dumps({**json.loads(good), "annotations": []}))
    with pytest.raises(DatasetError, match=r"instances_val2017.json leaves no usable image in .*val2017$"):
        CocoInstances(coco / "val2017", ann, train=True)
    data = json.loads(good)
    data["annotations"] = [dict(a, category_id=77) for a in data["annotations"]]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"leaves no usable image in .*val2017 \(skipped annotations: \d+ with an "
                                           r"unknown category\)"):
        CocoInstances(coco / "val2017", ann, train=True)
    data = json.loads(good)
    data["categories"] = data["categories"][:2] + [{"id": 10, "name": "star"}]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"the categories of .*instances_train2017.json and .*instances_val2017.json "
                                           r"differ: both splits need the same category list"):
        CocoDataModule(root=str(coco), num_classes=3, batch_size=2).setup("fit")
    ann.write_text(good)
    shutil.rmtree(coco / "val2017")
    with pytest.raises(DatasetError, match=r"image folder .*val2017 does not exist \(expected the COCO layout"):
        val_split()

    class Trainer:
        world_size = 3

    with pytest.raises(DatasetError, match=r"data.batch_size=4 is the global batch size and must divide by the number "
                                           r"of processes \(3\); pick a multiple of 3"):
        per_device_batch_size(4, Trainer())


def test_an_embedded_dataset_is_written_once_whole_or_not_at_all(tmp_path) -> None:
    from vision_mamba.data.common import write_dataset_once

    root = tmp_path / "nested" / "data" / "shapes"  # parents made as needed
    made = []

    def write(folder: Path) -> str:
        made.append(folder)
        (folder / "a.png").write_bytes(b"png")
        return "one image"

    assert write_dataset_once(root, write) == root
    # filled in a hidden sibling named after the root and this process, then renamed onto the root
    assert re.fullmatch(rf"\.shapes-{os.getpid()}-[0-9a-f]{{8}}", made[0].name) and made[0].parent == root.parent
    assert sorted(p.name for p in root.iterdir()) == [".complete", "a.png"]
    assert (root / ".complete").read_text() == "one image\n"
    assert write_dataset_once(root, write) == root and len(made) == 1  # complete: not written again
    (root / ".complete").unlink()  # a stale, unmarked folder from an interrupted write: replaced whole
    (root / "half.png").write_bytes(b"")
    assert write_dataset_once(root, write) == root and len(made) == 2
    assert sorted(p.name for p in root.iterdir()) == [".complete", "a.png"]
    assert sorted(p.name for p in root.parent.iterdir()) == ["shapes"]

    # a failed write leaves nothing behind and its own error stands, even where the folder is gone already
    def fail(folder: Path) -> str:
        (folder / "a.png").write_bytes(b"png")
        raise KeyboardInterrupt

    def fail_after_removing(folder: Path) -> str:
        folder.rmdir()
        raise ValueError("disk gone")

    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        write_dataset_once(other, fail)
    with pytest.raises(ValueError, match="^disk gone$"):
        write_dataset_once(other, fail_after_removing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nested"]


def test_a_loader_workers_traceback_is_cut_to_our_own_message() -> None:
    # the text torch's ExceptionWrapper.reraise builds from a DatasetError raised in a worker
    worker = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 3, in f\n    raise DatasetError("a: b: c")\n'
              "vision_mamba.data.errors.DatasetError: a: b: c\n")
    assert str(DatasetError(worker)) == "a: b: c"
    assert str(DatasetError("a: b: c")) == "a: b: c"
