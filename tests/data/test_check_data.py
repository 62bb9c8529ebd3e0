"""`python src/check_data.py data=<name> data.root=DIR`: every file of every split read as training reads it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import compose_config
from PIL import Image
from test_train import write_tiny_imagenet
from test_user_errors import run

from check_data import check
from data.awkward import set_coco_entry, truncate, write_awkward_ade20k, write_awkward_coco, write_bad_images
from vision_mamba.data.ade20k import ADE20KDataModule
from vision_mamba.data.check import SplitCheck, check_splits
from vision_mamba.data.coco import CocoDataModule
from vision_mamba.data.errors import DatasetError


def test_imagenet_clean_then_bad_files_exit_status_and_summary(tmp_path, capsys) -> None:
    root = write_tiny_imagenet(tmp_path / "imagenet")
    args = ["data=imagenet", f"data.root={root}", "data.num_classes=3", "workers=2", "progress=false"]
    assert check(compose_config("check_data.yaml", args)) == 0
    out = capsys.readouterr().out
    assert "train: classes 3, images 18, images per class 6-6" in out
    assert "val: classes 3, images 9, images per class 3-3" in out and "all 27 samples of" in out

    bad = write_bad_images(root / "val" / "n01443537")
    proc = run(args, tmp_path, "check_data.py")  # the command line: exit status 1, one line per bad file
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("bad: "))
    expected = sorted((f"bad: val: {path} {problem}" for path, problem in (
        (bad["truncated"], "is truncated ("),
        (bad["corrupt"], "cannot be read (OSError: "),
        (bad["text"], "is not an image (Pillow does not recognise its format)"),
        (bad["empty"], "is empty (0 bytes)"))))
    assert len(lines) == 4 and all(line.startswith(want) for line, want in zip(lines, expected)), lines
    assert "4 unusable file(s)" in proc.stdout and "data.bad_images=skip" in proc.stdout
    assert not list(tmp_path.glob("logs")) and not list(tmp_path.glob("outputs"))  # a check writes nothing

    (root / "val" / "n01443537").rename(root / "val" / "n00000000")
    with pytest.raises(DatasetError, match="only in train/: n01443537; only in val/: n00000000"):
        check(compose_config("check_data.yaml", args))


def test_ade20k_pairs_masks_and_label_range(tmp_path) -> None:
    write_awkward_ade20k(tmp_path / "ade", num_classes=5)
    base = tmp_path / "ade" / "ADEChallengeData2016"
    truncate(base / "annotations" / "training" / "rgba.png")
    mask = base / "annotations" / "validation" / "odd.png"
    labels = np.asarray(Image.open(mask)).copy()
    labels[0, 0] = 9
    Image.fromarray(labels).save(mask)
    dm = ADE20KDataModule(root=str(tmp_path / "ade"), num_classes=5)
    splits = dm.check_plan()
    bad = check_splits(splits, workers=1, show_progress=False)
    assert [(b.split, b.path, b.problem.split(" (")[0]) for b in bad] == [
        ("training", str(base / "annotations" / "training" / "rgba.png"), "is truncated"),
        ("validation", str(mask), "holds label 9, outside 0-5 for data.num_classes=5")]
    training, validation = splits
    assert training.summary["image/mask pairs"] == validation.summary["image/mask pairs"] == 15
    # file labels 0..5 in every readable mask (0 = "other", ignored): stripes of equal width
    assert str(training.summary["mask labels"]).startswith("0-5 (6 distinct; label 0, ignored: ")


def test_coco_images_sizes_and_annotation_summary(tmp_path) -> None:
    root = tmp_path / "coco"
    write_awkward_coco(root, "train2017")
    write_awkward_coco(root, "val2017")
    set_coco_entry(root, "val2017", "one_row.png", width=96)
    (root / "train2017" / "grey.png").write_bytes(b"")
    ann = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    del data["annotations"][0]["segmentation"]  # one box-only annotation
    ann.write_text(json.dumps(data))
    splits = CocoDataModule(root=str(root), num_classes=1).check_plan()
    bad = check_splits(splits, workers=2, show_progress=False)
    assert [str(b) for b in bad] == [
        f"train2017: {root / 'train2017' / 'grey.png'} is empty (0 bytes)",
        f"val2017: {root / 'val2017' / 'one_row.png'} is 97x1 but its entry in instances_val2017.json says 96x1"]
    train = splits[0].summary
    assert (train["images"], train["annotations"], train["crowd"], train["categories"]) == (16, 17, 1, 1)
    assert train["box-only (no usable segmentation)"] == 1 and train["images without annotation"] == 0


def test_a_bad_sample_is_named_by_its_file_and_problem_or_by_the_item_and_message() -> None:
    from vision_mamba.data.check import _read_one
    from vision_mamba.data.errors import BadImageError
    from vision_mamba.data.imagenet import names_list

    def read(item):
        if item == "bad":
            raise BadImageError.of("/data/x.jpg", "is truncated")
        if item == "odd":
            raise DatasetError("labels out of range")
        return len(item)

    assert _read_one(read, "fine") == (None, 4)
    assert _read_one(read, "bad") == (("/data/x.jpg", "is truncated"), None)
    assert _read_one(read, "odd") == (("odd", "labels out of range"), None)
    assert names_list([]) == "none" and names_list(["a", "b"], shown=2) == "a, b"
    assert names_list(["a", "b", "c"], shown=2) == "a, b and 1 more"


def _read_even(item: int) -> int:
    """A check's reader (module level: worker processes import it): odd items are unusable; gives its process id."""
    if item % 2:
        raise DatasetError(f"item {item} is odd")
    return os.getpid()


def test_every_item_is_read_in_worker_processes_and_shown_in_the_progress_bar(capsys, monkeypatch) -> None:
    pids = []
    split = SplitCheck("train", list(range(40)), _read_even, merge=pids.append)
    bad = check_splits([split], workers=2, show_progress=True)
    assert [(b.split, b.path, b.problem) for b in bad] == sorted(
        ("train", str(i), f"item {i} is odd") for i in range(1, 40, 2))
    assert len(pids) == 20 and os.getpid() not in pids  # merged here, read in the workers
    out = capsys.readouterr().out
    assert f"{'train':>12} " in out and " 40/40 " in out  # the split's name right-aligned, items done of the total
    # one worker: read in this process; so too where the number of CPUs is unknown
    pids.clear()
    assert len(check_splits([split], workers=1, show_progress=False)) == 20
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert len(check_splits([split], show_progress=False)) == 20
    assert pids == [os.getpid()] * 40
    assert capsys.readouterr().out == ""
