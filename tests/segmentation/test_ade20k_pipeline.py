"""The ADE20K loader's pieces against mmseg's definitions: the label lookup and check, the cat_max_ratio crop, the
photometric distortion, and the training/evaluation pipelines on pairs whose expected output is computed by hand."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from vision_mamba.data.ade20k import (
    ADE20KDataModule,
    CatMaxRatioCrop,
    check_labels,
    label_lut,
    list_pairs,
    photometric_distortion,
    resolve_root,
)
from vision_mamba.data.bad_files import BadFileReport
from vision_mamba.data.errors import SKIP_HINT, BadImageError, DatasetError

# ---- file labels -> training labels --------------------------------------------------------------------------------


def test_label_lut_is_a_uint8_table_of_every_file_label() -> None:
    reduced = np.full(256, 255, np.uint8)
    reduced[1:6] = [0, 1, 2, 3, 4]  # mmseg's reduce_zero_label: 0 ("other") -> 255, k -> k - 1
    kept = np.full(256, 255, np.uint8)
    kept[:5] = [0, 1, 2, 3, 4]
    for reduce_zero_label, expected in ((True, reduced), (False, kept)):
        lut = label_lut(5, reduce_zero_label)
        assert lut.dtype == np.uint8 and np.array_equal(lut, expected), reduce_zero_label


def check_message(mask: np.ndarray, num_classes: int, reduce_zero_label: bool) -> str | None:
    try:
        check_labels(mask.astype(np.uint8), Path("m.png"), num_classes, reduce_zero_label)
    except BadImageError as err:
        return str(err)
    return None


def test_check_labels_accepts_the_documented_ranges_and_names_the_first_label_outside() -> None:
    def outside(label: int, limit: int) -> str:
        return (f"m.png holds label {label}, outside 0-{limit} for data.num_classes=5: fix the mask or set "
                f"data.num_classes, {SKIP_HINT}")

    # reduce_zero_label: 0..num_classes (0 = "other"); a 255 in the file is a label like any other
    assert check_message(np.array([[0, 5]]), 5, True) is None
    assert check_message(np.array([[0, 6]]), 5, True) == outside(6, 5)
    assert check_message(np.array([[5, 255]]), 5, True) == outside(255, 5)
    # without it: 0..num_classes - 1, and 255 already marks ignored pixels
    assert check_message(np.array([[0, 4]]), 5, False) is None
    assert check_message(np.array([[0, 4, 255]]), 5, False) is None
    assert check_message(np.array([[4, 5, 255]]), 5, False) == outside(5, 4)


# ---- CatMaxRatioCrop: mmseg's RandomCrop(cat_max_ratio) -------------------------------------------------------------


class ScriptedDraws:
    """Stands in for the transform's random.Random: randint returns the planned values, in order."""

    def __init__(self, values: list[int]) -> None:
        self.values, self.used = list(values), 0

    def randint(self, low: int, high: int) -> int:
        value = self.values[self.used]
        assert low <= value <= high
        self.used += 1
        return value


def crop_with(draws: list[int], mask: np.ndarray | None, cat_max_ratio: float = 0.75, size: int = 8):
    crop = CatMaxRatioCrop(size, cat_max_ratio)
    crop.py_random = ScriptedDraws(draws)
    data = {"image": np.zeros((*mask.shape, 3), np.uint8)} if mask is not None else {}
    if mask is not None:
        data["mask"] = mask
    shape = mask.shape if mask is not None else (8, 20)
    params = crop.get_params_dependent_on_data({"shape": shape}, data)
    return params["crop_coords"], crop.py_random.used // 2  # (x0, y0, x1, y1), crops drawn


def halves() -> np.ndarray:
    """8 x 20: class 1 in columns 0-9, class 2 in 10-19. An 8-wide crop at x0 holds 10 - x0 columns of class 1."""
    return np.repeat(np.where(np.arange(20) < 10, 1, 2)[None, :], 8, axis=0).astype(np.uint8)


def test_crop_is_redrawn_until_no_class_covers_cat_max_ratio() -> None:
    # x0 = 0: one class; x0 = 4: 6 of 8 columns, exactly 0.75 (not below); x0 = 6: 4 of 8, kept
    assert crop_with([0, 0, 0, 4, 0, 6, 0, 1], halves()) == ((6, 0, 14, 8), 3)
    # cat_max_ratio 1 (mmseg's default): the first crop is kept, whatever it holds
    assert crop_with([0, 0, 0, 6], halves(), cat_max_ratio=1.0) == ((0, 0, 8, 8), 1)
    # no mask (an image-only pipeline): the first crop
    assert crop_with([0, 3, 0, 6], None) == ((3, 0, 11, 8), 1)


def test_crop_ignores_ignored_pixels_and_gives_up_after_ten_redraws() -> None:
    # classes 1 | 255 | 2 in columns 0-7 | 8-11 | 12-19: at x0 = 4 the crop holds class 1 and ignored pixels only
    mask = np.repeat(np.select([np.arange(20) < 8, np.arange(20) < 12], [1, 255], 2)[None, :], 8, axis=0)
    assert crop_with([0, 4, 0, 6], mask.astype(np.uint8)) == ((6, 0, 14, 8), 2)
    # one class everywhere: mmseg checks 10 crops, then keeps an 11th unchecked
    single = np.ones((8, 20), np.uint8)
    assert crop_with([v for x0 in range(12) for v in (0, x0)], single) == ((10, 0, 18, 8), 11)


def test_crop_never_pads_and_keeps_its_arguments_in_repr_and_serialisation() -> None:
    crop = CatMaxRatioCrop(32, cat_max_ratio=0.5, ignore_index=7)
    out = crop(image=np.full((10, 50, 3), 9, np.uint8), mask=np.arange(500, dtype=np.uint8).reshape(10, 50) % 3)
    assert out["image"].shape == (10, 32, 3) and (out["image"] == 9).all() and out["mask"].shape == (10, 32)
    assert repr(crop) == "CatMaxRatioCrop(p=1.0, size=32, cat_max_ratio=0.5, ignore_index=7)"
    again = A.from_dict(A.to_dict(crop))
    assert (again.size, again.cat_max_ratio, again.ignore_index) == (32, 0.5, 7)
    assert repr(CatMaxRatioCrop(8)) == "CatMaxRatioCrop(p=1.0, size=8, cat_max_ratio=0.75, ignore_index=255)"  # ADE20K's


# ---- photometric distortion -----------------------------------------------------------------------------------------


def test_photometric_distortion_is_mmsegs_four_steps_at_half_probability() -> None:
    """mmseg: brightness delta 32 (of 255), contrast x[0.5, 1.5], saturation x[0.5, 1.5], hue delta 18 in OpenCV's
    0-180 hue units (36 of 360 degrees, 0.1 of the circle); each step alone, with probability 0.5."""
    brightness, contrast, saturation, hue = photometric_distortion()
    assert brightness.brightness_limit == pytest.approx((-32 / 255, 32 / 255)) and brightness.contrast_limit == (0, 0)
    assert contrast.brightness_limit == (0, 0) and contrast.contrast_limit == pytest.approx((-0.5, 0.5))
    one = (1.0, 1.0)
    assert (saturation.brightness, saturation.contrast, saturation.saturation, saturation.hue) == (
        one, one, (0.5, 1.5), (0.0, 0.0))
    assert (hue.brightness, hue.contrast, hue.saturation, hue.hue) == (one, one, one, pytest.approx((-0.1, 0.1)))
    assert [t.p for t in (brightness, contrast, saturation, hue)] == [0.5] * 4


# ---- the datamodule's pipelines on hand-computed pairs ---------------------------------------------------------------

COLOUR = (100, 150, 200)
MEAN, STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)


def write_pairs(base: Path, split: str, masks: list[np.ndarray]) -> None:
    """PNG images (lossless, one colour) and their masks, in the release layout."""
    (base / "images" / split).mkdir(parents=True)
    (base / "annotations" / split).mkdir(parents=True)
    for i, mask in enumerate(masks):
        image = np.broadcast_to(np.array(COLOUR, np.uint8), (*mask.shape, 3))
        Image.fromarray(np.ascontiguousarray(image)).save(base / "images" / split / f"ADE_{i:04d}.png")
        Image.fromarray(mask).save(base / "annotations" / split / f"ADE_{i:04d}.png")


def label_pattern() -> np.ndarray:
    """6 x 10, labels 0-3 in the file."""
    return (np.add.outer(np.arange(6), np.arange(10)) % 4).astype(np.uint8)


def module(root: Path, **kwargs) -> ADE20KDataModule:
    settings = dict(num_classes=4, reduce_zero_label=False, img_size=24, scale=(10, 6), ratio_range=(2.0, 2.0),
                    hflip=0.0, photometric=False, mean=MEAN, std=STD, batch_size=2, num_workers=0)
    return ADE20KDataModule(root=str(root), **{**settings, **kwargs})


def normalised() -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(COLOUR, MEAN, STD)], dtype=torch.float32)


def test_training_pipeline_rescales_by_the_ratio_crops_pads_and_keeps_labels(tmp_path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    write_pairs(base, "training", [label_pattern()] * 2)
    write_pairs(base, "validation", [label_pattern()])
    dm = module(tmp_path)
    dm.setup("fit")
    image, mask = dm.data_train[0]
    # (10, 6) fits the 10 x 6 image at factor 1, times the ratio 2: 12 x 20 (nearest for the mask: each label 2 x 2),
    # then padded to 24 x 24 at the bottom right: 255 in the mask, 0 (after normalising) in the image
    expected = np.full((24, 24), 255)
    expected[:12, :20] = label_pattern().repeat(2, axis=0).repeat(2, axis=1)
    assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), expected)
    assert torch.allclose(image[:, :12, :20], normalised()[:, None, None].expand(3, 12, 20), atol=1e-6)
    assert not image[:, 12:].any() and not image[:, :, 20:].any()


def test_evaluation_pipeline_normalises_the_resized_image_and_keeps_the_mask(tmp_path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    write_pairs(base, "validation", [label_pattern()])
    for reduce_zero_label in (False, True):
        dm = module(tmp_path, reduce_zero_label=reduce_zero_label, scale=(20, 12))
        dm.setup("validate")
        image, mask = dm.data_val[0]
        raw = label_pattern().astype(np.int64)
        expected = np.where(raw == 0, 255, raw - 1) if reduce_zero_label else raw
        assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), expected)  # at the annotation's size
        assert torch.allclose(image, normalised()[:, None, None].expand(3, 12, 20), atol=1e-6)  # resized to fit


def test_training_transform_holds_the_configured_steps(tmp_path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    write_pairs(base, "validation", [label_pattern()])
    for photometric in (False, True):
        dm = module(tmp_path, cat_max_ratio=0.9, ratio_range=(0.5, 2.0), photometric=photometric)
        steps = A.to_dict(dm.train_transform())["transform"]["transforms"]
        names = [step["__class_fullname__"].rsplit(".", 1)[-1] for step in steps]
        middle = ["RandomBrightnessContrast"] * 2 + ["ColorJitter"] * 2 if photometric else []
        assert names == ["RescaleToFit", "CatMaxRatioCrop", "HorizontalFlip", *middle, "Normalize", "PadIfNeeded",
                         "ToTensorV2"]
        assert (steps[0]["scale"], steps[0]["ratio_range"]) == ((10, 6), (0.5, 2.0))
        assert (steps[1]["size"], steps[1]["cat_max_ratio"], steps[1]["ignore_index"]) == (24, 0.9, 255)


def test_setup_splits_the_batch_over_processes_reports_skips_and_validates_without_training_data(tmp_path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    write_pairs(base, "validation", [label_pattern()])
    dm = module(tmp_path, batch_size=4, bad_images="skip")
    dm.trainer = SimpleNamespace(world_size=2, callbacks=[])
    dm.setup("validate")  # no training split on disk: evaluation does not need one
    assert dm.data_train is None and len(dm.data_val) == 1
    assert dm.batch_size_per_device == 2
    assert [type(c) for c in dm.trainer.callbacks] == [BadFileReport]


def test_an_out_of_range_label_read_by_the_dataset_names_its_mask(tmp_path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    bad = label_pattern()
    bad[2, 3] = 9
    write_pairs(base, "validation", [bad])
    dm = module(tmp_path)
    dm.setup("validate")
    with pytest.raises(BadImageError) as caught:
        dm.data_val[0]
    path = base / "annotations" / "validation" / "ADE_0000.png"
    assert caught.value.path == str(path)
    assert str(caught.value).startswith(f"{path} holds label 9, outside 0-3 for data.num_classes=4: ")


def test_a_root_with_only_images_or_nothing_is_refused_naming_the_layout(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    hint = ("expected the ADE20K release layout: ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg and "
            "ROOT/ADEChallengeData2016/annotations/{training,validation}/*.png (ROOT may also be "
            "ADEChallengeData2016 itself)")
    with pytest.raises(DatasetError) as caught:
        resolve_root(tmp_path)
    assert str(caught.value) == f"data.root={tmp_path} holds no images/ and annotations/ folders ({hint})"
    with pytest.raises(DatasetError) as caught:
        resolve_root(tmp_path / "nope")
    assert str(caught.value) == f"data.root={tmp_path / 'nope'} does not exist ({hint})"


def test_pairs_are_the_image_files_with_their_masks_and_a_missing_mask_is_named(tmp_path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    write_pairs(base, "training", [label_pattern()] * 2)
    (base / "images" / "training" / "index.txt").write_text("not an image")  # other files and folders are not images
    (base / "images" / "training" / "folder.jpg").mkdir()
    (base / "images" / "training" / "ADE_0002.JPG").write_bytes((base / "images" / "training" / "ADE_0000.png")
                                                               .read_bytes())
    with pytest.raises(DatasetError) as caught:
        list_pairs(base, "training")
    image, mask = base / "images" / "training" / "ADE_0002.JPG", base / "annotations" / "training" / "ADE_0002.png"
    assert str(caught.value) == (f"{image} has no annotation {mask}: every image needs a mask of the same name "
                                 "(or remove the image)")
    (base / "images" / "training" / "ADE_0002.JPG").unlink()
    assert [(i.name, m.name) for i, m in list_pairs(base, "training")] == [("ADE_0000.png", "ADE_0000.png"),
                                                                          ("ADE_0001.png", "ADE_0001.png")]
