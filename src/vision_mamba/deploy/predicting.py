"""Predicting on image files with a trained run: the inputs, the run's evaluation preprocessing, batched inference
on CPU or GPU, and the files written per task (labels, masks and overlays, COCO results and drawings)."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from vision_mamba.data.ade20k import RescaleToFit
from vision_mamba.data.coco import CategoryMap, load_coco
from vision_mamba.data.images import read_rgb
from vision_mamba.deploy.runs import LoadedRun, class_names
from vision_mamba.tasks.detection import draw_predictions, to_coco_results
from vision_mamba.tasks.segmentation import palette
from vision_mamba.utils.errors import UserError
from vision_mamba.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

INPUT_HINT = "give an image, a folder of images (read recursively) or a quoted glob such as 'photos/*.jpg'"


class InputError(UserError):
    """An input path that holds no image, or an image that cannot be read."""


def list_images(spec: str) -> tuple[list[Path], Path]:
    """The image files of `spec` (a file, a folder searched recursively, or a glob) in sorted order, and the folder
    their output names are taken relative to."""
    path = Path(spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
        base = path
    elif glob.has_magic(spec):
        files = [p for p in map(Path, sorted(glob.glob(spec, recursive=True)))
                 if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
        base = Path(os.path.commonpath([p.parent for p in files])) if files else path.parent
    else:
        raise InputError(f"input={spec} does not exist: {INPUT_HINT}")
    if not files:
        raise InputError(f"input={spec} holds no image files ({', '.join(IMG_EXTENSIONS)}): {INPUT_HINT}")
    return files, base


class _Images(Dataset):
    """Reads the images as the data loaders do (vision_mamba.data.images.read_rgb) and preprocesses them, in loader
    workers; an unreadable one yields its error message, raised as one line by the main process."""

    def __init__(self, files: list[Path], base: Path, read) -> None:
        self.files, self.base, self.read = files, base, read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        item = {"path": path, "name": path.relative_to(self.base).as_posix()}
        try:
            item.update(self.read(path))
        except Exception as e:  # noqa: BLE001 - any failure to decode is reported with the file's name
            # a BadImageError's own problem (its message also names data.bad_images, which predict does not read)
            reason = getattr(e, "problem", "") or (str(e).strip().splitlines() or [type(e).__name__])[-1]
            item["error"] = f"{path} is not a readable image ({reason}): replace or remove it"
        return item


class Predictor:
    """One task's reading, inference and output files. Subclasses set `read` (a path -> dict of tensors and what
    the output needs, run in loader workers), `predict` (a list of read items, on `device`) and `finish`."""

    def __init__(self, run: LoadedRun, datamodule: Any, output: Path, device: torch.device, cfg: Any) -> None:
        self.run, self.datamodule, self.output, self.device, self.cfg = run, datamodule, output, device, cfg

    def read(self, path: Path) -> dict[str, Any]:
        raise NotImplementedError

    def predict(self, items: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def finish(self) -> list[Path]:
        """Write what was gathered; the files written."""
        raise NotImplementedError

    def _file(self, folder: str, name: str) -> Path:
        path = self.output / folder / Path(name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


class ClassificationPredictor(Predictor):
    """Top-k class names and softmax scores per image: predictions.csv (one row per image) and predictions.json."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.transform = self.datamodule.build_transform(is_training=False)
        self.names = class_names(self.run, self.datamodule)
        self.top_k = min(int(self.cfg.top_k), self.run.task.hparams.num_classes)
        self.rows: list[dict[str, Any]] = []

    def read(self, path: Path) -> dict[str, Any]:
        return {"image": self.transform(read_rgb(path))}

    @torch.no_grad()
    def predict(self, items: list[dict[str, Any]]) -> None:
        logits = self.run.task(torch.stack([it["image"] for it in items]).to(self.device)).float()
        scores, labels = logits.softmax(-1).topk(self.top_k, dim=-1)
        for item, top_scores, top_labels in zip(items, scores.tolist(), labels.tolist()):
            top = [{"index": i, "label": self.names[i] if self.names else str(i), "score": s}
                   for i, s in zip(top_labels, top_scores)]
            self.rows.append({"file": item["name"], "top_k": top})

    def finish(self) -> list[Path]:
        table, listing = self.output / "predictions.csv", self.output / "predictions.json"
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file"] + [f"{c}_{k}" for k in range(1, self.top_k + 1) for c in ("label", "score")])
            for row in self.rows:
                writer.writerow([row["file"]] + [v for t in row["top_k"] for v in (t["label"], f"{t['score']:.6f}")])
        listing.write_text(json.dumps(self.rows, indent=1))
        return [table, listing]


class SegmentationPredictor(Predictor):
    """Per image: masks/<name>.png, the class index of every pixel at the image's own size (a palette PNG: its
    values are the indices 0..K-1, viewers show the colours), and overlays/<name>.png, the colours over the image.
    The evaluation's resize and sliding window, with the logits resized to the image before the argmax."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        hp = self.datamodule.hparams
        self.resize, self.transform = RescaleToFit(hp.scale), self.datamodule.eval_transform()
        self.colours = palette()
        self.written = 0

    def read(self, path: Path) -> dict[str, Any]:
        image = np.asarray(read_rgb(path))
        resized = self.resize(image=image)["image"]
        return {"image": self.transform(image=resized)["image"], "rgb": image}

    @torch.no_grad()
    def predict(self, items: list[dict[str, Any]]) -> None:
        for group in _same_shape(items):
            logits = self.run.task.predict_logits(torch.stack([it["image"] for it in group]).to(self.device))
            for item, window_logits in zip(group, logits):
                size = item["rgb"].shape[:2]
                full = F.interpolate(window_logits[None], size=size, mode="bilinear", align_corners=False)
                self._write(item, full[0].argmax(0).to(torch.uint8).cpu().numpy())

    def _write(self, item: dict[str, Any], mask: np.ndarray) -> None:
        indexed = Image.fromarray(mask, mode="P")
        indexed.putpalette(self.colours.reshape(-1).tolist())
        indexed.save(self._file("masks", item["name"]))
        blend = (0.5 * item["rgb"] + 0.5 * self.colours[mask]).round().astype(np.uint8)
        Image.fromarray(blend).save(self._file("overlays", item["name"]))
        self.written += 1

    def finish(self) -> list[Path]:
        return [self.output / "masks", self.output / "overlays"]


class DetectionPredictor(Predictor):
    """coco_results.json (COCO results format: original category ids, xywh boxes, RLE masks), images.json (the
    COCO `images` entries the results refer to) and drawings/<name>.png (confident boxes and masks). Image ids and
    category ids come from the run's test annotation file when it lists the image (so the results can be scored
    against it); otherwise images are numbered 1..N and labels stand for themselves."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        hp = self.datamodule.hparams
        ann_file = Path(self.datamodule.root) / hp.ann_file.format(split=hp.test_split or hp.val_split)
        coco = load_coco(ann_file) if ann_file.is_file() else None
        if coco is None:
            log.warning(f"No annotation file {ann_file}: category ids are the labels 1..K, images are numbered 1..N")
        self.categories = CategoryMap(coco.dataset["categories"]) if coco is not None else None
        self.ids = {Path(i["file_name"]).name: i["id"] for i in coco.dataset["images"]} if coco is not None else {}
        self.results: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []

    def read(self, path: Path) -> dict[str, Any]:
        rgb = np.array(read_rgb(path))  # a writable copy: torch.from_numpy wants one
        return {"image": torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)}

    def _image_id(self, item: dict[str, Any]) -> int:
        known = self.ids.get(item["path"].name)
        return int(known) if known is not None else len(self.images) + 1

    @torch.no_grad()
    def predict(self, items: list[dict[str, Any]]) -> None:
        hp = self.run.task.hparams
        to_cat_id = self.categories.to_cat_id if self.categories is not None else int
        names = list(self.categories.names) if self.categories is not None else None
        preds = self.run.task.net([it["image"].to(self.device) for it in items])
        for item, pred in zip(items, preds):
            pred = {k: v.cpu() for k, v in pred.items()}
            image_id = self._image_id(item)
            height, width = item["image"].shape[-2:]
            self.images.append({"id": image_id, "file_name": item["name"], "height": height, "width": width})
            self.results += to_coco_results(pred, image_id, to_cat_id, hp.mask_threshold)
            drawn = draw_predictions(item["image"], pred, names, hp.draw_score_threshold, hp.mask_threshold)
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(self._file("drawings", item["name"]))

    def finish(self) -> list[Path]:
        results, images = self.output / "coco_results.json", self.output / "images.json"
        results.write_text(json.dumps(self.results))
        images.write_text(json.dumps(self.images, indent=1))
        return [results, images, self.output / "drawings"]


PREDICTORS = {"classification": ClassificationPredictor, "segmentation": SegmentationPredictor,
              "detection": DetectionPredictor}


def _same_shape(items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Runs of consecutive items whose images share a shape (they can be stacked into one batch)."""
    group: list[dict[str, Any]] = []
    for item in items:
        if group and item["image"].shape != group[0]["image"].shape:
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def predict_files(run: LoadedRun, datamodule: Any, cfg: Any, device: torch.device) -> tuple[int, list[Path]]:
    """Predict every image of `cfg.input` in batches of `cfg.batch_size`, writing into `cfg.output`.
    Returns the number of images and the files (or folders) written."""
    files, base = list_images(str(cfg.input))
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    predictor = PREDICTORS[run.kind](run, datamodule, output, device, cfg)
    run.task.to(device)
    loader = DataLoader(_Images(files, base, predictor.read), batch_size=int(cfg.batch_size),
                        num_workers=int(cfg.num_workers), collate_fn=list)
    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("predict", total=len(files))
        for items in loader:
            bad = next((it["error"] for it in items if "error" in it), None)
            if bad:
                raise InputError(bad)
            predictor.predict(items)
            progress.advance(bar, len(items))
    return len(files), predictor.finish()
