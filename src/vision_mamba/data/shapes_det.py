"""Embedded default detection data: drawn circles/squares/triangles written once as a COCO layout with instances json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from vision_mamba.data.coco import CocoDataModule
from vision_mamba.data.common import write_dataset_once

# deliberately sparse ids, as in COCO (1..90 for 80 classes), so the id <-> label mapping is exercised
CATEGORIES = [{"id": 2, "name": "circle"}, {"id": 5, "name": "square"}, {"id": 9, "name": "triangle"}]


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    """The outline of a shape of circumradius r as a flat [x1, y1, x2, y2, ...] polygon."""
    n = {"circle": 24, "square": 4, "triangle": 3}[kind]
    pts = []
    for k in range(n):
        a = angle + 2 * math.pi * k / n
        pts += [cx + r * math.cos(a), cy + r * math.sin(a)]
    return pts


def _rle_json(rle: dict) -> dict:
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def draw_split(out_dir: Path, split: str, num_images: int, rng: np.random.Generator, size_range=(96, 160),
               crowd_prob: float = 0.08, box_only: bool = False) -> dict:
    """Draw ``num_images`` images into out_dir/split and return their COCO instances dict.

    Shapes do not overlap, so each polygon is the exact visible outline. About half the instances are stored as
    polygons and half as compressed RLE; some images get an ``iscrowd`` cluster of small circles (uncompressed RLE);
    image 0 has no object at all. ``box_only`` leaves the segmentations out (a box-only dataset).
    """
    (out_dir / split).mkdir(parents=True)
    images, annotations = [], []
    kinds = [c["name"] for c in CATEGORIES]
    cat_id = {c["name"]: c["id"] for c in CATEGORIES}
    for i in range(num_images):
        w, h = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        background = rng.integers(0, 90, size=3)
        noise = rng.normal(0, 12, size=(h, w, 3))
        canvas = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        placed: list[tuple[float, float, float]] = []
        n_shapes = 0 if i == 0 else int(rng.integers(1, 5))
        for _ in range(n_shapes * 20):  # rejection sampling for non-overlapping discs
            if len(placed) == n_shapes:
                break
            r = float(rng.uniform(8, min(w, h) / 4))
            cx, cy = float(rng.uniform(r + 1, w - r - 1)), float(rng.uniform(r + 1, h - r - 1))
            if any(math.hypot(cx - x, cy - y) < r + pr + 3 for x, y, pr in placed):
                continue
            placed.append((cx, cy, r))
            kind = kinds[int(rng.integers(len(kinds)))]
            poly = _shape_polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            color = tuple(int(c) for c in rng.integers(120, 256, size=3))
            draw.polygon(poly, fill=color)
            mask_im = Image.new("L", (w, h), 0)
            ImageDraw.Draw(mask_im).polygon(poly, fill=1)
            mask = np.asarray(mask_im, dtype=np.uint8)
            rle = mask_utils.encode(np.asfortranarray(mask))
            segmentation = [[round(v, 2) for v in poly]] if rng.random() < 0.5 else _rle_json(rle)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id[kind], "iscrowd": 0,
                "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
            })
        if i > 0 and rng.random() < crowd_prob:
            # a crowd of tiny circles in a free corner region, labelled once as iscrowd (COCO's "people in a stand")
            x0, y0 = int(rng.integers(0, w - 24)), int(rng.integers(0, h - 24))
            if not any(math.hypot(x0 + 12 - x, y0 + 12 - y) < pr + 20 for x, y, pr in placed):
                mask_im = Image.new("L", (w, h), 0)
                mdraw = ImageDraw.Draw(mask_im)
                color = tuple(int(c) for c in rng.integers(120, 256, size=3))
                for _ in range(6):
                    px, py = x0 + float(rng.uniform(3, 21)), y0 + float(rng.uniform(3, 21))
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
                    mdraw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=1)
                mask = np.asarray(mask_im, dtype=np.uint8)
                rle = mask_utils.encode(np.asfortranarray(mask))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id["circle"], "iscrowd": 1,
                    "segmentation": _uncompressed_rle(mask), "area": float(mask_utils.area(rle)),
                    "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                })
        name = f"{i + 1:06d}.png"
        canvas.save(out_dir / split / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    if box_only:
        for ann in annotations:
            del ann["segmentation"]
    categories = [dict(c, supercategory="shape") for c in CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_shapes_coco(root: str | Path, num_train: int = 400, num_val: int = 60, seed: int = 0,
                      splits: tuple[str, str] = ("train2017", "val2017"), box_only: bool = False) -> Path:
    """Write the shapes dataset in the COCO layout under ``root``, once (a temporary folder renamed at the end, so an
    interrupted write never leaves a half-written dataset). ``box_only`` writes the box-only variant (the same images
    and boxes, no ``segmentation`` in the annotations)."""

    def write(folder: Path) -> str:
        rng = np.random.default_rng(seed)
        (folder / "annotations").mkdir()
        for split, n in zip(splits, (num_train, num_val)):
            coco = draw_split(folder, split, n, rng, box_only=box_only)
            (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        return f"{num_train} train, {num_val} val" + (", box-only" if box_only else "")

    return write_dataset_once(root, write)


class ShapesDetDataModule(CocoDataModule):
    """The COCO loader over the drawn shapes, written to ``root`` by ``prepare_data``."""

    def __init__(
        self, root: str, num_train: int = 400, num_val: int = 60, **kwargs,
    ) -> None:  # pragma: no mutate block (save_hyperparameters reads this frame, which mutmut would wrap)
        kwargs.setdefault("num_classes", len(CATEGORIES))
        super().__init__(root=root, **kwargs)
        self.num_train, self.num_val = num_train, num_val

    def prepare_data(self) -> None:
        write_shapes_coco(self.root, self.num_train, self.num_val)

