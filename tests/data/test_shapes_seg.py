"""The embedded segmentation data (drawn shapes): what draw_sample's docstring promises, measured on the pictures it
draws, and the ADE20K release layout write_shapes_ade20k and the datamodule write and read back."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vision_mamba.data.ade20k import list_pairs, resolve_root
from vision_mamba.data.shapes_seg import ShapesSegDataModule, _shape_polygon, draw_sample, write_shapes_ade20k

SIZE, COUNT = 96, 480
HUE = {2: 0.0, 3: 120.0, 4: 240.0}  # red circles, green squares, blue triangles, +-75 degrees
# area / R^2 of the shape of circumradius R: a disc, a square, an equilateral triangle
AREA_RATIO = {2: np.pi, 3: 2.0, 4: 3 * np.sqrt(3) / 4}


def measure(samples: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """From the pictures alone: the shapes of samples holding one shape (one connected region of one flat colour),
    and the background's level, left-to-right gradient and noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    found = {"regions": [], "shapes": [], "inner_noise": [], "background": [], "background_noise": []}
    for image, mask in samples:
        regions = sum(ndimage.label(mask == label)[1] for label in (2, 3, 4))
        found["regions"].append(regions)
        background = mask == 1
        x = xx[background] - (SIZE - 1) / 2
        channels = []
        for c in range(3):
            values = image[..., c][background].astype(float)
            slope, level = np.polyfit(x, values, 1)
            channels.append((level, slope * (SIZE - 1) / 2))
            residual = values - level - slope * x
            found["background_outlier"] = max(found.get("background_outlier", 0), np.abs(residual).max())
            if 70 < level - abs(slope) * SIZE / 2 and level + abs(slope) * SIZE / 2 < 185:  # never clipped
                found["background_noise"].append(residual)
        found["background"].append(channels)
        if regions != 1:
            continue
        label = int(mask[mask > 1][0])
        region = mask == label
        inner = image[ndimage.binary_erosion(region, iterations=2)].astype(float)
        if inner.std(0).max() > 12:  # two overlapping shapes of one class and two colours: not one shape
            continue
        cy, cx = yy[region].mean(), xx[region].mean()
        distance = np.hypot(yy[region] - cy, xx[region] - cx)
        radius = distance.max() + 0.5  # to the far edge of the farthest pixel
        far = distance.argmax()  # a corner of a polygon
        corner = np.arctan2(yy[region][far] - cy, xx[region][far] - cx)
        mean = inner.mean(0)
        h, s, v = colorsys.rgb_to_hsv(*(mean / 255))
        touches = region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any()
        margin = (min(cx, cy, SIZE - 1 - cx, SIZE - 1 - cy) + 0.5) / radius
        found["shapes"].append(dict(label=label, ratio=region.sum() / radius**2, radius=radius / SIZE, margin=margin,
                                    touches=touches, corner=corner, hue=(h * 360 - HUE[label] + 180) % 360 - 180, s=s, v=v))
        found["inner_noise"] += [inner[:, c] - mean[c] for c in range(3) if 40 < mean[c] < 215]
    return found


@pytest.fixture(scope="module")
def drawn() -> dict:
    rng = np.random.default_rng(0)
    samples = [draw_sample(rng, SIZE) for _ in range(COUNT)]
    for image, mask in samples[:20]:
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    labels = np.unique(np.stack([mask for _, mask in samples]))
    assert labels.tolist() == [1, 2, 3, 4]  # 0 ("other") never: background is class 1
    images = np.stack([image for image, _ in samples])
    assert images.min() == 0 and images.max() == 255  # the noise is clipped to the whole 0-255 range
    assert all((mask == 1).any() for _, mask in samples)
    return measure(samples)


def test_one_to_three_shapes_per_picture(drawn) -> None:
    regions = np.array(drawn["regions"])
    # one shape in a third of the pictures; overlapping shapes of a class merge, a shape on top may cut one in two
    assert 0.3 < np.mean(regions == 1) < 0.42
    assert regions.min() >= 1 and np.mean(regions <= 3) > 0.88


def test_each_class_has_its_shape_size_and_place(drawn) -> None:
    shapes = drawn["shapes"]
    for label, ratio in AREA_RATIO.items():
        mine = [s for s in shapes if s["label"] == label]
        assert len(mine) > 30, label
        # the measured radius reaches the far edge of the outermost pixel: a few % over; polygons are drawn with
        # their edge pixels, discs within
        ratios = [s["ratio"] for s in mine if not s["touches"]]
        assert ratio * 0.85 < min(ratios) and max(ratios) < ratio * 1.045, label
        radii = np.array([s["radius"] for s in mine if not s["touches"]])
        low, high = (0.12, 0.25) if label != 4 else (0.12 * 1.15, 0.25 * 1.15)
        bias = 1 / SIZE  # a disc of radius r is 2r + 1 pixels wide; the radius is measured to the far pixel edge
        assert low - 0.006 < radii.min() < low + 0.02 and high - 0.02 < radii.max() < high + bias + 0.004, label
        assert abs(radii.mean() - (low + high) / 2 - bias / 2) < 0.015, label
        if label != 4:  # circles and squares lie wholly inside
            assert min(s["margin"] for s in mine) > 0.93, label


def test_polygons_turn_every_way(drawn) -> None:
    for label, corners in ((3, 4), (4, 3)):
        period = 2 * np.pi / corners
        turns = np.sort([s["corner"] % period for s in drawn["shapes"] if s["label"] == label and not s["touches"]])
        gaps = np.diff(np.concatenate([turns, [turns[0] + period]]))
        assert gaps.max() < 0.25 * period, label  # uniform over the turns that differ: no wide gap


def test_each_shape_is_one_colour_of_its_class_hue_band(drawn) -> None:
    shapes = drawn["shapes"]
    hues, s, v = (np.array([shape[key] for shape in shapes]) for key in ("hue", "s", "v"))
    assert np.abs(hues).max() < 75.5 and hues.min() < -65 and hues.max() > 65
    assert 0.59 < s.min() < 0.65 and 0.96 < s.max() < 1.0
    assert 0.585 < v.min() < 0.65 and 0.96 < v.max() < 1.0
    assert np.concatenate(drawn["inner_noise"]).std() == pytest.approx(8.0, abs=0.2)


def test_background_is_a_gradient_with_texture(drawn) -> None:
    level, amplitude = np.array(drawn["background"]).transpose(2, 0, 1)  # (picture, channel) each
    assert 49.5 < level.min() < 56 and 190 < level.max() < 201.5  # 60-200 times 0.85-1
    assert np.abs(amplitude).max() < 31.5 and amplitude.min() < -27 and amplitude.max() > 27
    # each channel its own level and gradient: coloured, not grey
    assert np.median(np.ptp(level, axis=1)) > 20 and np.median(np.ptp(amplitude, axis=1)) > 10
    assert np.concatenate(drawn["background_noise"]).std() == pytest.approx(np.hypot(18, 8), abs=0.25)
    # clipped to 0-255, not wrapped around: no pixel 6.5 sigma away from its channel's gradient
    assert drawn["background_outlier"] < 6.5 * np.hypot(18, 8)


def test_polygons_are_regular_with_their_first_corner_at_the_angle() -> None:
    for kind, corners in ((2, 4), (3, 3)):
        points = np.array(_shape_polygon(kind, 10.0, 20.0, 5.0, 0.3))
        assert len(points) == corners
        offsets = points - (10.0, 20.0)
        assert np.allclose(np.hypot(*offsets.T), 5.0)
        angles = np.arctan2(offsets[:, 1], offsets[:, 0])
        assert np.allclose(np.diff(np.unwrap(angles)), 2 * np.pi / corners) and np.isclose(angles[0], 0.3)


def test_written_release_is_the_ade20k_layout_of_the_drawn_samples_written_once(tmp_path) -> None:
    root = write_shapes_ade20k(tmp_path / "shapes", num_train=5, num_val=3, size=24, seed=7)
    assert root == tmp_path / "shapes" and resolve_root(root) == root / "ADEChallengeData2016"
    assert (root / ".complete").read_text() == "5 training, 3 validation, 24px, seed 7\n"
    rng = np.random.default_rng(7)  # one generator, training then validation
    for split, count in (("training", 5), ("validation", 3)):
        pairs = list_pairs(root / "ADEChallengeData2016", split)
        assert [(image.name, mask.name) for image, mask in pairs] == [
            (f"shapes_{split}_{i:05d}.jpg", f"shapes_{split}_{i:05d}.png") for i in range(count)]
        for image_path, mask_path in pairs:
            image, mask = draw_sample(rng, 24)
            with Image.open(image_path) as jpeg, Image.open(mask_path) as png:
                assert (jpeg.format, jpeg.mode, jpeg.size, png.format, png.mode) == ("JPEG", "RGB", (24, 24), "PNG", "L")
                assert np.array_equal(np.asarray(png), mask)
                # quality 95: IJG scales the standard tables by (200 - 2 * 95)%, the luminance DC step 16 to 2
                assert jpeg.quantization[0][0] == (16 * (200 - 2 * 95) + 50) // 100 == 2
                # the drawn pixels, up to JPEG's loss (its 2x2 chroma subsampling blurs the noise): 4x4 block means
                blocks = (np.asarray(jpeg).astype(float) - image).reshape(6, 4, 6, 4, 3).mean(axis=(1, 3))
                assert np.abs(blocks).mean() < 5
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert write_shapes_ade20k(root, num_train=2, num_val=2, size=8, seed=1) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_datamodule_writes_its_sizes_with_seed_0_and_reads_them_back(tmp_path) -> None:
    dm = ShapesSegDataModule(root=str(tmp_path / "shapes"), num_train=4, num_val=2, image_size=16, batch_size=2,
                             num_workers=0, scale=(16, 16), ratio_range=None, hflip=0.0, photometric=False, img_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), dm.num_classes) == (4, 2, 4)
    rng = np.random.default_rng(0)
    masks = [draw_sample(rng, 16)[1] for _ in range(6)]
    for dataset, drawn_masks in ((dm.data_train, masks[:4]), (dm.data_val, masks[4:])):
        for i, expected in enumerate(drawn_masks):
            image, mask = dataset[i]
            assert tuple(image.shape) == (3, 16, 16)
            assert np.array_equal(mask.numpy(), expected.astype(np.int64) - 1)  # file label k is class k - 1
