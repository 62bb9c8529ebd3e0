"""The ImageNet datamodule's loaders, check plan and checkpoint state, in process (no worker processes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import write_tiny_imagenet
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from vision_mamba.data.bad_files import BadFileReport
from vision_mamba.data.errors import DatasetError
from vision_mamba.data.imagenet import ImageFolderDataModule
from vision_mamba.data.images import check_image
from vision_mamba.data.resumable import ResumableDataLoader

CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture
def root(tmp_path) -> Path:
    return write_tiny_imagenet(tmp_path / "imagenet", per_class=(6, 3))  # 18 training, 9 validation images


def datamodule(root: Path, stage: str = "fit", trainer=None, **kw) -> ImageFolderDataModule:
    kw = {"num_classes": 3, "img_size": 16, "batch_size": 4, "num_workers": 0, **kw}
    dm = ImageFolderDataModule(root=str(root), **kw)
    dm.trainer = trainer
    dm.setup(stage)
    return dm


def test_the_training_loader_resumes_in_distributed_samplers_order_from_the_global_seed(root, monkeypatch) -> None:
    def order(seed: int) -> list[int]:
        return list(DistributedSampler(range(18), num_replicas=1, rank=0, shuffle=True, seed=seed))

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything sets, in every DDP process alike
    train = datamodule(root).train_dataloader()
    assert isinstance(train, ResumableDataLoader)
    assert list(train.sampler) == order(7) != order(0)
    assert (train.batch_size, train.drop_last, len(train)) == (4, True, 4)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    dm = datamodule(root)
    assert list(dm.train_dataloader().sampler) == order(0)
    # evaluation loaders: in order, every image, and not stateful (a checkpoint keeps no position for them)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert type(loader) is DataLoader and isinstance(loader.sampler, SequentialSampler)
        assert (loader.batch_size, loader.drop_last, len(loader)) == (4, False, 3)


def test_repeated_augmentation_uses_timms_sampler_for_this_process(root) -> None:
    dm = datamodule(root, repeated_aug=True, batch_size=2)
    train = dm.train_dataloader()
    assert type(train) is DataLoader
    sampler = train.sampler
    assert isinstance(sampler, RepeatAugSampler) and (sampler.num_replicas, sampler.rank) == (1, 0)
    assert list(sampler) == list(RepeatAugSampler(dm.data_train, num_replicas=1, rank=0, shuffle=True))
    assert list(sampler) != sorted(sampler)  # shuffled
    # under DDP: this process's share (a stand-in trainer: only world_size and global_rank are read)
    two = datamodule(root, "fit", SimpleNamespace(world_size=2, global_rank=1), repeated_aug=True, batch_size=2)
    sampler = two.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank, two.batch_size_per_device) == (2, 1, 1)
    assert list(sampler) == list(RepeatAugSampler(two.data_train, num_replicas=2, rank=1, shuffle=True))


def test_a_bad_last_file_is_replaced_by_the_first_under_skip(root) -> None:
    last = sorted((root / "val" / CLASSES[-1]).iterdir())[-1]
    last.write_bytes(b"not a JPEG at all")
    dm = datamodule(root, "validate", bad_images="skip")
    data = dm.data_val
    assert data.samples[-1][0] == str(last)
    image, label = data[len(data) - 1]  # skip wraps round to index 0 (the same replacement every time)
    first, first_label = data[0]
    assert torch.equal(image, first) and label == first_label == 0
    assert dm.bad_files.read_new() == [(str(last), "is not an image (Pillow does not recognise its format)")]


def test_check_plan_lists_every_image_of_both_splits(root) -> None:
    for i in (6, 7):  # an uneven class: 8 images
        (root / "train" / CLASSES[0] / f"{CLASSES[0]}_{i}.JPEG").write_bytes(
            (root / "train" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG").read_bytes())
    plans = ImageFolderDataModule(root=str(root), num_classes=3, batch_size=2).check_plan()
    assert [p.name for p in plans] == ["train", "val"]
    for plan, images, per_class in zip(plans, (20, 9), ("6-8", "3-3")):
        assert plan.items == [str(p) for c in CLASSES for p in sorted((root / plan.name / c).iterdir())]
        assert plan.read is check_image and plan.merge is None
        assert plan.summary == {"classes": 3, "images": images, "images per class": per_class}
    # the training split is checked too, and first
    for p in (root / "train" / CLASSES[1]).iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=f"class folder {root / 'train' / CLASSES[1]} holds no images"):
        ImageFolderDataModule(root=str(root), num_classes=3, batch_size=2).check_plan()


def test_state_dict_holds_the_class_names_once_set_up(root) -> None:
    dm = ImageFolderDataModule(root=str(root), num_classes=3, batch_size=2)
    assert dm.state_dict() == {}
    dm.setup("validate")
    assert dm.state_dict() == {"class_names": CLASSES}
    assert datamodule(root, "fit").state_dict() == {"class_names": CLASSES}


def test_validation_needs_only_the_validation_split_and_training_gets_the_training_transforms(root) -> None:
    shutil.move(root / "train", root.parent / "train-elsewhere")  # validating or testing never reads train/
    dm = datamodule(root, "validate")
    assert dm.data_train is None and len(dm.data_val) == 9
    shutil.move(root.parent / "train-elsewhere", root / "train")
    dm = datamodule(root, "fit")
    # timm's training pipeline (random crop, flip, jitter) for training; resize + centre crop for evaluation
    assert [type(t).__name__ for t in dm.data_train.transform.transforms] == [
        "ToRGB", "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ColorJitter", "MaybeToTensor",
        "Normalize"]
    assert [type(t).__name__ for t in dm.data_val.transform.transforms] == [
        "ToRGB", "Resize", "CenterCrop", "MaybeToTensor", "Normalize"]


def test_skip_has_the_trainer_report_the_skipped_files(root) -> None:
    trainer = SimpleNamespace(world_size=1, global_rank=0, callbacks=[])
    dm = datamodule(root, "fit", trainer, bad_images="skip")
    assert [type(c) for c in trainer.callbacks] == [BadFileReport]
    assert trainer.callbacks[0].bad_files is dm.bad_files
    dm.setup("validate")  # once per trainer
    assert len(trainer.callbacks) == 1


def test_layout_messages_name_the_folder_and_the_fix(root, tmp_path) -> None:
    layout = "expected the ImageNet layout: ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG"
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        datamodule(missing)
    assert str(err.value) == f"data.root={missing} does not exist ({layout})"
    # a class folder holding only files that are not images (any case of torchvision's extensions is an image)
    folder = root / "val" / CLASSES[1]
    for p in folder.iterdir():
        p.unlink()
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.jpg").mkdir()  # a folder, whatever its name
    with pytest.raises(DatasetError) as err:
        datamodule(root, "validate")
    assert str(err.value) == (f"class folder {folder} holds no images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, "
                              ".tiff, .webp): add images or remove the folder")
    (folder / "scan.TIFF").write_bytes((root / "val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG").read_bytes())
    assert datamodule(root, "validate").data_val.classes == CLASSES
