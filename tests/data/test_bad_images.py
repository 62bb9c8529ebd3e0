"""data.bad_images: an unusable image or mask stops a run with one line naming it and the option (error), or is
skipped, counted and listed (skip), found in the main process or in loader workers, for ImageNet, ADE20K and COCO."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_train import write_tiny_imagenet
from test_user_errors import assert_short_error, run

from data.awkward import set_coco_entry, truncate, write_awkward_ade20k, write_awkward_coco, write_bad_images
from vision_mamba.data.ade20k import ADE20KDataModule
from vision_mamba.data.bad_files import MAX_IN_A_ROW, BadFileReport, BadFiles, _remove
from vision_mamba.data.coco import CocoDataModule
from vision_mamba.data.errors import BadImageError, DatasetError
from vision_mamba.data.imagenet import ImageFolderDataModule
from vision_mamba.data.images import check_image, read_mask, read_rgb

PROBLEMS = {"truncated": "is truncated", "corrupt": "cannot be read (OSError: ", "text": "is not an image",
            "empty": "is empty"}


# ---- reading -------------------------------------------------------------------------------------------------------
def test_each_kind_of_bad_file_is_one_line_naming_it_and_the_option(tmp_path) -> None:
    for kind, path in write_bad_images(tmp_path).items():
        with pytest.raises(BadImageError) as caught:
            read_rgb(path)
        err = caught.value
        assert err.path == str(path) and err.problem.startswith(PROBLEMS[kind])
        assert str(err).startswith(f"{path} {PROBLEMS[kind]}") and "data.bad_images=skip" in str(err)
        assert "\n" not in str(err)


def test_truncated_and_non_index_masks_are_bad_files(tmp_path) -> None:
    labels = (np.arange(40 * 60).reshape(40, 60) % 7).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "mask.png")
    assert np.array_equal(read_mask(tmp_path / "mask.png"), labels)
    with pytest.raises(BadImageError, match=r"mask\.png is truncated"):
        read_mask(truncate(tmp_path / "mask.png"))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(BadImageError) as caught:
        read_mask(tmp_path / "rgb.png")
    assert str(caught.value) == (f"{tmp_path / 'rgb.png'} is a RGB image, not a single-channel class-index mask: "
                                 "save it as a single-channel (L or P) PNG of class indices, or pass "
                                 "data.bad_images=skip to skip such files (python src/check_data.py lists them all)")


def test_the_data_check_reads_an_image_as_the_loaders_do(tmp_path) -> None:
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "good.png")
    assert check_image(tmp_path / "good.png") is None
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError) as caught:
        check_image(tmp_path / "empty.jpg")
    assert caught.value.path == str(tmp_path / "empty.jpg") and caught.value.problem == "is empty (0 bytes)"


def test_nothing_we_import_lets_pillow_accept_truncated_files() -> None:
    """Truncation is detected by Pillow's decoder, unless LOAD_TRUNCATED_IMAGES is set somewhere."""
    import check_data  # noqa: F401
    import eval  # noqa: F401
    import train  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---- the policy ----------------------------------------------------------------------------------------------------
def test_skip_replaces_deterministically_counts_and_gives_up_on_a_broken_dataset() -> None:
    bad_at = {2, 3}

    def load(i: int) -> int:
        if i in bad_at:
            raise BadImageError.of(f"/data/{i}.JPEG", "is truncated")
        return i

    with pytest.raises(DatasetError, match="data.bad_images=bogus is not an option"):
        BadFiles("bogus")
    with pytest.raises(BadImageError, match="2.JPEG"):
        BadFiles("error").load(2, 6, load)
    skip = BadFiles("skip")
    assert [skip.load(i, 6, load) for i in range(6)] == [0, 1, 4, 4, 4, 5]  # the next usable index, every time
    assert [skip.load(i, 6, load) for i in range(6)] == [0, 1, 4, 4, 4, 5]
    assert skip.read_new() == [(f"/data/{i}.JPEG", "is truncated") for i in (2, 3, 3)] * 2
    assert skip.read_new() == []
    bad_at = set(range(1000))
    with pytest.raises(DatasetError, match=f"{MAX_IN_A_ROW} samples in a row from index 7 cannot be used"):
        skip.load(7, 1000, load)


def test_the_record_gives_back_each_skip_once_whole() -> None:
    err = BadImageError.of("/data/a photo.JPEG", "is empty (0 bytes)")
    assert str(err) == ("/data/a photo.JPEG is empty (0 bytes): replace or delete it, or pass data.bad_images=skip to "
                        "skip such files (python src/check_data.py lists them all)")
    skip = BadFiles("skip")
    skip.record(err)
    skip.record(BadImageError.of("/data/b.JPEG", "cannot be read (decoder:\tbad\tmarker) X"))  # tabs, a last X
    skip.record(BadImageError.of("/data/c.JPEG", "is truncated "))  # a trailing space
    assert skip.read_new() == [("/data/a photo.JPEG", "is empty (0 bytes)"),
                               ("/data/b.JPEG", "cannot be read (decoder:\tbad\tmarker) X"),
                               ("/data/c.JPEG", "is truncated ")]
    for name in ("d", "eeeeeeeeeeee"):  # each read starts where the last one ended
        skip.record(BadImageError.of(f"/data/{name}.JPEG", "is truncated"))
        assert skip.read_new() == [(f"/data/{name}.JPEG", "is truncated")]
    with open(skip.record_path, "ab") as f:  # a line a worker is still writing waits for its end
        f.write(b"/data/f.JPEG\tis emp")
    assert skip.read_new() == []
    with open(skip.record_path, "ab") as f:
        f.write(b"ty (0 bytes)\n")
    assert skip.read_new() == [("/data/f.JPEG", "is empty (0 bytes)")]


def test_the_record_is_removed_with_its_policy_by_the_process_that_made_it() -> None:
    skip = BadFiles("skip")
    path = skip.record_path
    _remove(path, os.getpid() + 1)  # a forked loader worker's copy of the finalizer leaves it
    assert os.path.exists(path)
    del skip
    gc.collect()
    assert not os.path.exists(path)
    _remove(path, os.getpid())  # already gone: nothing to do


def test_the_report_lists_skipped_files_once_per_epoch_in_the_log_and_the_run_folder(tmp_path, caplog) -> None:
    skip = BadFiles("skip")
    report = BadFileReport(skip)
    run_dir = tmp_path / "runs" / "run"  # made by the report, parents and all
    trainer = SimpleNamespace(global_rank=0, default_root_dir=str(run_dir), current_epoch=0, sanity_checking=True)
    listed = run_dir / "bad_images.txt"

    def met(*names: str) -> None:
        for name in names:
            skip.record(BadImageError.of(f"/d/{name}.JPEG", f"problem {name}"))

    caplog.set_level(logging.WARNING, logger="vision_mamba.data.bad_files")
    met("b", "a", "b")
    report.on_validation_epoch_end(trainer, None)  # the sanity check: reported with the first epoch
    assert caplog.messages == [] and not run_dir.exists()
    trainer.sanity_checking = False
    report.on_validation_epoch_end(trainer, None)
    assert caplog.messages == [f"data.bad_images=skip: epoch 0 skipped 2 unusable file(s) (3 time(s)), 2 in this run "
                               f"so far, listed in {listed}: /d/b.JPEG (problem b); /d/a.JPEG (problem a)"]
    assert listed.read_text() == "/d/a.JPEG\tproblem a\n/d/b.JPEG\tproblem b\n"
    report.on_train_epoch_end(trainer, None)  # nothing new since: no line
    assert len(caplog.messages) == 1

    trainer.current_epoch = 1
    ten = [f"{i:02d}" for i in range(10)]
    met(*ten)
    report.on_train_epoch_end(trainer, None)
    shown = "; ".join(f"/d/{n}.JPEG (problem {n})" for n in ten)
    assert caplog.messages[-1] == (f"data.bad_images=skip: epoch 1 skipped 10 unusable file(s) (10 time(s)), 12 in "
                                   f"this run so far, listed in {listed}: {shown}")  # all ten shown
    twelve = [f"{i:02d}" for i in range(10, 22)]
    met("a", *twelve)
    report.on_test_epoch_end(trainer, None)
    shown = "; ".join(f"/d/{n}.JPEG (problem {n})" for n in ["a", *twelve[:9]])
    assert caplog.messages[-1] == (f"data.bad_images=skip: the test skipped 13 unusable file(s) (13 time(s)), 24 in "
                                   f"this run so far, listed in {listed}: {shown}; and 3 more")
    assert listed.read_text() == "".join(f"/d/{n}.JPEG\tproblem {n}\n" for n in sorted(ten + twelve + ["a", "b"]))
    assert sorted(p.name for p in run_dir.iterdir()) == ["bad_images.txt"]

    # another process of a multi-process run lists what it met in a file of its own
    other = BadFiles("skip")
    other.record(BadImageError.of("/d/z.JPEG", "problem z"))
    BadFileReport(other).on_test_epoch_end(SimpleNamespace(global_rank=1, default_root_dir=str(run_dir)), None)
    assert (run_dir / "bad_images.rank1.txt").read_text() == "/d/z.JPEG\tproblem z\n"
    assert listed.read_text().count("\n") == 24


# ---- ImageNet, in loader workers -----------------------------------------------------------------------------------
@pytest.fixture
def imagenet_with_bad_files(tmp_path) -> tuple[Path, dict[str, Path]]:
    root = write_tiny_imagenet(tmp_path / "imagenet", per_class=(6, 4))
    bad = {f"train_{k}": v for k, v in write_bad_images(root / "train" / "n01443537").items()}
    bad |= {f"val_{k}": v for k, v in write_bad_images(root / "val" / "n01484850").items()}
    return root, bad


def imagenet(root: Path, mode: str, workers: int = 2) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root=str(root), num_classes=3, img_size=32, batch_size=3, num_workers=workers,
                               persistent_workers=False, pin_memory=False, bad_images=mode,
                               train_transform={"auto_augment": None, "re_prob": 0.0})
    dm.setup("fit")
    return dm


def test_error_in_a_loader_worker_is_one_line_naming_the_file(imagenet_with_bad_files) -> None:
    root, bad = imagenet_with_bad_files
    dm = imagenet(root, "error")
    with pytest.raises(BadImageError) as caught:
        for _ in dm.val_dataloader():
            pass
    message = str(caught.value)
    assert "Traceback" not in message and "\n" not in message
    assert any(message.startswith(f"{path} {PROBLEMS[k[4:]]}") for k, path in bad.items() if k.startswith("val_"))
    assert message.endswith("or pass data.bad_images=skip to skip such files (python src/check_data.py lists them all)")


def test_skip_in_loader_workers_records_every_bad_file(imagenet_with_bad_files) -> None:
    root, bad = imagenet_with_bad_files
    dm = imagenet(root, "skip")
    batches = [b for loader in (dm.train_dataloader(), dm.val_dataloader()) for b in loader]
    assert sum(len(y) for _, y in batches) == (len(dm.data_train) // 3) * 3 + len(dm.data_val)
    assert all(x.shape[1:] == (3, 32, 32) for x, _ in batches)
    recorded = dict(dm.bad_files.read_new())  # written by the worker processes
    assert set(recorded) == {str(p) for p in bad.values()}
    assert all(recorded[str(p)].startswith(PROBLEMS[k.split("_", 1)[1]]) for k, p in bad.items()), recorded


# ---- ADE20K: images and masks --------------------------------------------------------------------------------------
def test_ade20k_bad_image_and_masks_error_or_skip(tmp_path) -> None:
    write_awkward_ade20k(tmp_path / "ade")
    base = tmp_path / "ade" / "ADEChallengeData2016"
    truncate(base / "annotations" / "training" / "rgba.png")
    truncate(base / "images" / "training" / "grey_jpeg.jpg")
    small = base / "annotations" / "validation" / "odd.png"
    Image.fromarray(np.asarray(Image.open(small))[:-3]).save(small)

    def datamodule(mode: str) -> ADE20KDataModule:
        dm = ADE20KDataModule(root=str(tmp_path / "ade"), num_classes=5, img_size=32, scale=(128, 32),
                              batch_size=2, num_workers=1, persistent_workers=False, pin_memory=False,
                              bad_images=mode)
        dm.setup("fit")
        return dm

    dm = datamodule("error")
    index = {image.name: i for i, (image, _) in enumerate(dm.data_train.pairs)}
    with pytest.raises(BadImageError, match=r"training/rgba\.png is truncated .*data\.bad_images=skip"):
        dm.data_train[index["rgba.png"]]
    with pytest.raises(BadImageError, match=r"training/grey_jpeg\.jpg is truncated"):
        dm.data_train[index["grey_jpeg.jpg"]]
    with pytest.raises(BadImageError, match=r"validation/odd\.png is 53x34 but its image odd\.png is 53x37: a mask "
                                            r"must have its image's size"):
        for _ in dm.val_dataloader():  # in a loader worker
            pass
    dm = datamodule("skip")
    assert len([dm.data_train[i] for i in range(len(dm.data_train))]) == 15
    assert sum(len(y) for _, y in dm.val_dataloader()) == 15  # in a loader worker
    assert {str(Path(p).relative_to(base)) for p, _ in dm.bad_files.read_new()} == {
        "annotations/training/rgba.png", "images/training/grey_jpeg.jpg", "annotations/validation/odd.png"}


# ---- COCO ----------------------------------------------------------------------------------------------------------
def test_coco_bad_image_files_and_sizes_error_or_skip(tmp_path) -> None:
    root = tmp_path / "coco"
    expected = write_awkward_coco(root, "val2017")
    write_awkward_coco(root, "train2017")
    truncate(expected["rgb"]["image"].path)  # the val copy
    (root / "val2017" / "palette.png").write_text("not a png")
    set_coco_entry(root, "val2017", "odd.png", width=53 + 1)

    def datamodule(mode: str) -> CocoDataModule:
        dm = CocoDataModule(root=str(root), num_classes=1, img_size=64, batch_size=2, num_workers=0,
                            persistent_workers=False, pin_memory=False, bad_images=mode)
        dm.setup("fit")
        return dm

    val = datamodule("error").data_val
    index = {kind: val.ids.index(e["id"]) for kind, e in expected.items()}
    with pytest.raises(BadImageError, match=r"val2017/rgb\.png is truncated"):
        val[index["rgb"]]
    with pytest.raises(BadImageError, match=r"val2017/palette\.png is not an image"):
        val[index["palette"]]
    with pytest.raises(BadImageError, match=r"odd\.png is 53x37 but its entry in instances_val2017\.json says 54x37: "
                                            r"fix width/height in the json"):
        val[index["odd"]]
    dm = datamodule("skip")
    assert sum(len(t) for _, t in dm.val_dataloader()) == len(expected)
    assert {Path(p).name for p, _ in dm.bad_files.read_new()} == {"rgb.png", "palette.png", "odd.png"}


# ---- through src/train.py ------------------------------------------------------------------------------------------
TRAIN = ["model=vim_digits", "data=imagenet", "data.num_classes=3", "data.img_size=32", "data.batch_size=2",
         "data.num_workers=2", "data.persistent_workers=false", "data.pin_memory=false", "trainer=cpu",
         "trainer.max_epochs=2", "task.schedule.warmup_epochs=1", "model.scan_backend=torch", "extras.print_config=false", "~logger",
         "~callbacks.lr_monitor", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "test=false"]


def test_train_py_error_and_skip(imagenet_with_bad_files, tmp_path) -> None:
    root, bad = imagenet_with_bad_files
    proc = run([*TRAIN, f"data.root={root}"], tmp_path)
    assert_short_error(proc, "data.bad_images=skip")
    assert proc.returncode == 2 and len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1
    assert any(f"error: {path} {PROBLEMS[k.split('_', 1)[1]]}" in proc.stderr for k, path in bad.items())

    run_dir = tmp_path / "skip_run"
    proc = run([*TRAIN, f"data.root={root}", "data.bad_images=skip", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = dict(line.split("\t") for line in (run_dir / "bad_images.txt").read_text().splitlines())
    assert set(listed) == {str(p) for p in bad.values()}
    log = (run_dir / "train.log").read_text()
    # once per epoch (sanity-check finds are reported with epoch 0), naming the run folder's list
    for epoch in (0, 1):
        assert log.count(f"data.bad_images=skip: epoch {epoch} skipped") == 1, log[-3000:]
    assert f"listed in {run_dir / 'bad_images.txt'}" in log
