"""Awkward real-world files for the tests of all three loaders: images in every mode a photo collection holds, odd
sizes, EXIF rotation, masks of other modes and sizes, COCO entries that disagree with their files, broken files.

Every image comes with the RGB pixels a loader must return, derived from the arrays written (a palette lookup, a
shift, Pillow's documented CMYK formula), never by reading the file back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

EXIF_ORIENTATION = 0x0112


@dataclass
class Awkward:
    """One image file and what a loader must return for it: (H, W, 3) uint8 RGB in stored pixel order."""

    path: Path
    expected: np.ndarray
    atol: int = 0  # 0 for lossless files; JPEG gets a few levels


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth content (JPEG keeps it within a few levels) that still differs everywhere: gradients plus an offset."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(20, 120, 3)
    return np.stack([base[0] + xx * 100 // max(w, 1), base[1] + yy * 100 // max(h, 1), base[2] + (xx + yy) % 32],
                    -1).astype(np.uint8)


def write_awkward_images(folder: Path, size: tuple[int, int] = (48, 64), tiff: bool = True) -> dict[str, Awkward]:
    """Write one image of each awkward kind into ``folder`` (PNG/JPEG; TIFF for lossless CMYK when ``tiff``).

    ``size`` is (H, W) of the regular kinds (a multiple of 16, so the EXIF JPEG's halves are whole JPEG blocks).
    """
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    out: dict[str, Awkward] = {}

    rgb = _pattern(h, w, 0)
    Image.fromarray(rgb).save(folder / "rgb.png")
    out["rgb"] = Awkward(folder / "rgb.png", rgb)

    grey = _pattern(h, w, 1)[..., 0]
    Image.fromarray(grey, mode="L").save(folder / "grey.png")
    out["grey"] = Awkward(folder / "grey.png", np.repeat(grey[..., None], 3, -1))

    grey_jpeg = _pattern(h, w, 2)[..., 1]
    Image.fromarray(grey_jpeg, mode="L").save(folder / "grey_jpeg.jpg", quality=98)
    out["grey_jpeg"] = Awkward(folder / "grey_jpeg.jpg", np.repeat(grey_jpeg[..., None], 3, -1), atol=3)

    palette = np.random.default_rng(3).integers(0, 256, (256, 3), dtype=np.uint8)
    index = (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)
    # transparency as a tRNS table of alpha per palette entry, as image editors write it
    for name, extra in (("palette", {}), ("palette_transparent", {"transparency": bytes(range(0, 256, 16))})):
        img = Image.fromarray(index, mode="P")
        img.putpalette(palette.flatten().tolist())
        img.save(folder / f"{name}.png", **extra)
        out[name] = Awkward(folder / f"{name}.png", palette[index])

    rgba = np.concatenate([_pattern(h, w, 4), np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0)], -1)
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    out["rgba"] = Awkward(folder / "rgba.png", rgba[..., :3])  # alpha dropped, as torchvision's loader does

    la = np.stack([_pattern(h, w, 5)[..., 2], np.full((h, w), 128, np.uint8)], -1)
    Image.fromarray(la, mode="LA").save(folder / "grey_alpha.png")
    out["grey_alpha"] = Awkward(folder / "grey_alpha.png", np.repeat(la[..., :1], 3, -1))

    # 16-bit grey spanning the whole range: the 8 most significant bits are the picture
    grey16 = (np.arange(h * w).reshape(h, w) * (65535 // (h * w))).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    out["grey16"] = Awkward(folder / "grey16.png", np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1))

    bilevel = (np.indices((h, w)).sum(0) % 3 == 0)
    Image.fromarray(bilevel).save(folder / "bilevel.png")
    out["bilevel"] = Awkward(folder / "bilevel.png", np.repeat(bilevel[..., None] * np.uint8(255), 3, -1))

    cmyk = np.concatenate([_pattern(h, w, 6), np.full((h, w, 1), 40, np.uint8)], -1)
    # Pillow's CMYK -> RGB: R = (255 - C) * (255 - K) / 255, rounded (likewise G from M, B from Y)
    cmyk_rgb = np.round((255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(folder / "cmyk_jpeg.jpg", quality=98)  # ImageNet holds a few of these
    out["cmyk_jpeg"] = Awkward(folder / "cmyk_jpeg.jpg", cmyk_rgb, atol=3)
    if tiff:
        Image.fromarray(cmyk, mode="CMYK").save(folder / "cmyk.tif")
        out["cmyk"] = Awkward(folder / "cmyk.tif", cmyk_rgb, atol=1)

    for name, (oh, ow) in (("one_pixel", (1, 1)), ("one_row", (1, 97)), ("one_column", (83, 1)), ("odd", (37, 53))):
        odd = _pattern(oh, ow, 7)
        Image.fromarray(odd).save(folder / f"{name}.png")
        out[name] = Awkward(folder / f"{name}.png", odd)

    out["exif_rotated"] = write_exif_rotated(folder / "exif_rotated.jpg", size)
    return out


def write_exif_rotated(path: Path, size: tuple[int, int] = (48, 64)) -> Awkward:
    """A landscape JPEG whose EXIF says "rotate 90 degrees to display" (orientation 6, what phones write): left half
    white, right half black as stored. Loaders ignore EXIF, so they must return it as stored."""
    h, w = size
    stored = np.zeros((h, w, 3), np.uint8)
    stored[:, : w // 2] = 255
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = 6
    img.save(path, quality=98, exif=exif.tobytes())
    return Awkward(path, stored, atol=3)


# ---- broken files --------------------------------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_bad_images(folder: Path, suffix: str = ".JPEG") -> dict[str, Path]:
    """A truncated JPEG, a PNG with a damaged data stream, a text file named like an image, and a zero-byte file
    (all named ``*suffix``: loaders go by the content, as Pillow does)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / f"truncated{suffix}"
    Image.fromarray(_pattern(64, 80, 8)).save(good, format="JPEG", quality=90)
    corrupt = folder / f"corrupt{suffix}"
    Image.fromarray(_pattern(64, 80, 9)).save(corrupt, format="PNG")
    data = bytearray(corrupt.read_bytes())
    data[60:76] = bytes(16)  # inside the first IDAT chunk: the header reads, the pixels do not
    corrupt.write_bytes(data)
    text = folder / f"text{suffix}"
    text.write_text("<html>404 Not Found</html>\n")
    empty = folder / f"empty{suffix}"
    empty.write_bytes(b"")
    return {"truncated": truncate(good), "corrupt": corrupt, "text": text, "empty": empty}


# ---- ADE20K --------------------------------------------------------------------------------------------------------
def write_awkward_ade20k(root: Path, num_classes: int = 5) -> dict[str, dict]:
    """An ADEChallengeData2016 release whose training and validation images are the awkward kinds (the ones ADE20K
    accepts: PNG and JPEG), each with a mask of stripes of labels 0..num_classes in a different mask mode (L, P,
    16-bit). Returns, per image stem, the image's expected RGB (and tolerance) and the mask's file labels."""
    base = root / "ADEChallengeData2016"
    expected: dict[str, dict] = {}
    mask_modes = ("L", "P", "I;16")
    for split in ("training", "validation"):
        image_dir, mask_dir = base / "images" / split, base / "annotations" / split
        mask_dir.mkdir(parents=True, exist_ok=True)
        images = write_awkward_images(image_dir, tiff=False)
        for i, (kind, item) in enumerate(sorted(images.items())):
            h, w = item.expected.shape[:2]
            labels = (np.arange(w)[None, :].repeat(h, 0) * (num_classes + 1) // max(w, 1)).astype(np.uint8)
            mode = mask_modes[i % len(mask_modes)]
            mask = Image.fromarray(labels.astype(np.uint16)) if mode == "I;16" else Image.fromarray(labels, mode=mode)
            if mode == "P":
                mask.putpalette(np.random.default_rng(i).integers(0, 256, 768).tolist())
            mask.save(mask_dir / f"{item.path.stem}.png")
            expected[f"{split}/{item.path.stem}"] = {"image": item, "labels": labels, "kind": kind, "mode": mode}
    return expected


# ---- COCO ----------------------------------------------------------------------------------------------------------
def _box_ann(ann_id: int, image_id: int, mask: np.ndarray, category: int = 1, crowd: int = 0,
             uncompressed: bool = False) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if uncompressed:  # COCO's crowd format: column-major run lengths, starting with a run of zeros
        flat = mask.flatten(order="F").astype(np.uint8)
        counts = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
        segmentation = {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}
    else:
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
    return {"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": crowd,
            "segmentation": segmentation, "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def write_awkward_coco(root: Path, split: str = "val2017") -> dict[str, dict]:
    """A COCO split whose images are the awkward kinds, each with one object (a rectangle covering its left half,
    the EXIF image's white half included) and, on the grey image, a crowd region in uncompressed RLE. Returns, per
    image kind, its image id, expected RGB and object mask (stored pixel order)."""
    image_dir = root / split
    images = write_awkward_images(image_dir)
    entries, anns, expected = [], [], {}
    for image_id, (kind, item) in enumerate(sorted(images.items()), start=1):
        h, w = item.expected.shape[:2]
        entries.append({"id": image_id, "file_name": item.path.name, "width": w, "height": h})
        mask = np.zeros((h, w), np.uint8)
        mask[:, : max(1, w // 2)] = 1
        anns.append(_box_ann(len(anns) + 1, image_id, mask))
        crowd = None
        if kind == "grey":
            crowd = np.zeros((h, w), np.uint8)
            crowd[h // 2 :, w // 2 :] = 1
            anns.append(_box_ann(len(anns) + 1, image_id, crowd, crowd=1, uncompressed=True))
        expected[kind] = {"id": image_id, "image": item, "mask": mask, "crowd": crowd}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return expected


def set_coco_entry(root: Path, split: str, file_name: str, **fields) -> None:
    """Change one image entry of an instances json (e.g. a width/height that disagrees with the file)."""
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    for entry in data["images"]:
        if entry["file_name"] == file_name:
            entry.update(fields)
    path.write_text(json.dumps(data))
