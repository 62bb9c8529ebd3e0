"""src/predict.py on the embedded data: image by image the predictions behind eval.py's accuracy / mIoU / mAP for the
same checkpoint, and bad input as one error line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, Exec, as_job, compose_config, make_fast
from omegaconf import open_dict
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from eval import adopt_run_config, evaluate
from predict import predict
from vision_mamba.checkpointing import check_weights_source, load_checkpoint
from vision_mamba.deploy import load_run
from vision_mamba.deploy.runs import class_names
from vision_mamba.utils.errors import find_user_error


def eval_config(ckpt: Path, out: Path):
    """The config `python src/eval.py ckpt_path=<ckpt>` runs with (the run's own model, data and task), on the
    whole test split."""
    cfg = make_fast(compose_config("eval.yaml", [f"ckpt_path={ckpt}"]), out, ckpt.parents[2] / "data")
    with open_dict(cfg):
        cfg.trainer.limit_test_batches = 1.0
    job = as_job(cfg)
    adopt_run_config(job)
    return job


def eval_metrics(job) -> dict[str, float]:
    """What eval.py reports."""
    return {k: float(v) for k, v in evaluate(job)[0].items()}


def run_predict(entry_config, ckpt: Path, images, out: Path, *extra: str) -> None:
    predict(entry_config("predict", [f"ckpt_path={ckpt}", f"input={images}", f"output={out}", *extra]))


def test_classification_predictions_are_the_ones_eval_scores(trained, entry_config, tmp_path) -> None:
    ckpt = trained("classification") / "checkpoints" / "last.ckpt"
    job = eval_config(ckpt, tmp_path / "eval")
    metrics = eval_metrics(job)
    datamodule = hydra.utils.instantiate(job.data)
    run_predict(entry_config, ckpt, Path(datamodule.root) / "val", tmp_path / "out", "num_workers=0")
    rows = {row["file"]: row["top_k"] for row in json.loads((tmp_path / "out" / "predictions.json").read_text())}

    # the same images through the datamodule's own validation pipeline (ImageFolder + eval transform) and the task
    datamodule.setup("validate")
    task = load_run(job).task
    files = [Path(path).relative_to(Path(datamodule.root) / "val").as_posix() for path, _ in datamodule.data_val.samples]
    with torch.no_grad():
        probs = torch.cat([task(images).softmax(-1) for images, _ in datamodule.val_dataloader()])
    assert sorted(rows) == sorted(files) and len(files) == 360
    top1 = torch.tensor([rows[f][0]["index"] for f in files])
    assert torch.equal(top1, probs.argmax(-1)), "per-image top-1 differs from the evaluation pipeline's"
    scores = torch.tensor([rows[f][0]["score"] for f in files])
    assert torch.allclose(scores, probs.max(-1).values, atol=1e-5)
    assert [rows[f][0]["label"] for f in files] == [datamodule.data_val.classes[i] for i in top1]

    labels = torch.tensor([label for _, label in datamodule.data_val.samples])
    accuracy = MulticlassAccuracy(num_classes=10, top_k=1, average="micro")(top1, labels).item()
    assert accuracy == pytest.approx(metrics["test/acc1"], abs=1e-6)
    table = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert table[0].startswith("file,label_1,score_1") and len(table) == 361


def test_segmentation_masks_are_the_ones_eval_scores(trained, entry_config, tmp_path) -> None:
    ckpt = trained("segmentation") / "checkpoints" / "last.ckpt"
    job = eval_config(ckpt, tmp_path / "eval")
    metrics = eval_metrics(job)
    datamodule = hydra.utils.instantiate(job.data)
    datamodule.setup("validate")
    images = Path(datamodule.data_val.pairs[0][0]).parent
    run_predict(entry_config, ckpt, images, tmp_path / "out", "num_workers=1", "batch_size=16")

    task = load_run(job).task
    miou = MulticlassJaccardIndex(4, ignore_index=255, average="macro", validate_args=False)
    masks, evaluated = [], []
    with torch.no_grad():
        for images_batch, targets in datamodule.val_dataloader():  # the evaluation's own slide + resize + argmax
            logits = F.interpolate(task.predict_logits(images_batch), size=targets.shape[-2:], mode="bilinear")
            evaluated += list(logits.argmax(1))
    for (image_path, _), reference in zip(datamodule.data_val.pairs, evaluated):
        mask_file = tmp_path / "out" / "masks" / (image_path.stem + ".png")
        mask = torch.from_numpy(np.asarray(Image.open(mask_file))).long()
        assert torch.equal(mask, reference), f"{mask_file} differs from the evaluation's argmax"
        assert (tmp_path / "out" / "overlays" / mask_file.name).is_file()
        masks.append(mask)
    assert len({int(c) for m in masks for c in m.unique()}) > 1, "the model predicts one class: the test proves nothing"
    targets = [datamodule.data_val[i][1] for i in range(len(datamodule.data_val))]
    for mask, target in zip(masks, targets):
        miou.update(mask[None], target[None])
    assert miou.compute().item() == pytest.approx(metrics["test/mIoU"], abs=1e-6)


def test_detection_results_are_the_ones_eval_scores(trained, entry_config, tmp_path) -> None:
    from faster_coco_eval import COCO, COCOeval_faster

    ckpt = trained("detection") / "checkpoints" / "last.ckpt"
    job = eval_config(ckpt, tmp_path / "eval")
    with open_dict(job):
        job.trainer.limit_test_batches = 2  # 8 images: Mask R-CNN on the CPU
        job.task.write_results = True
    metrics = eval_metrics(job)
    evaluated = json.loads((tmp_path / "eval" / "coco_results_test.json").read_text())
    root = Path(hydra.utils.instantiate(job.data).root)
    annotations = root / "annotations" / "instances_val2017.json"
    listed = sorted(json.loads(annotations.read_text())["images"], key=lambda i: i["id"])[:8]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for info in listed:
        shutil.copy(root / "val2017" / info["file_name"], inputs)
    run_predict(entry_config, ckpt, inputs, tmp_path / "out", "num_workers=0", "batch_size=3")
    predicted = json.loads((tmp_path / "out" / "coco_results.json").read_text())

    order = lambda r: (r["image_id"], -r["score"], r["bbox"])  # noqa: E731
    assert len(predicted) == len(evaluated) > 0
    for got, ref in zip(sorted(predicted, key=order), sorted(evaluated, key=order)):
        assert (got["image_id"], got["category_id"]) == (ref["image_id"], ref["category_id"])
        assert got["score"] == pytest.approx(ref["score"], abs=2e-5)
        assert got["bbox"] == pytest.approx(ref["bbox"], abs=0.02)
    named = {i["file_name"]: i["id"] for i in json.loads((tmp_path / "out" / "images.json").read_text())}
    assert named == {i["file_name"]: i["id"] for i in listed}
    assert len(list((tmp_path / "out" / "drawings").glob("*.png"))) == 8

    # the COCO AP of predict's results file, scored against the annotations of the same 8 images
    gt = COCO(str(annotations))
    for iou_type in ("bbox", "segm"):
        scored = COCOeval_faster(gt, gt.loadRes(predicted), iou_type, print_function=lambda *a, **k: None)
        scored.params.imgIds = [i["id"] for i in listed]
        scored.evaluate()
        scored.accumulate()
        scored.summarize()
        assert scored.stats[0] == pytest.approx(metrics[f"test/{iou_type}_mAP"], abs=1e-5), iou_type


# ---- bad input: one error line ------------------------------------------------------------------------------------


def user_error_of(call) -> str:
    with pytest.raises(Exception) as raised:
        call()
    error = find_user_error(raised.value)
    assert error is not None, f"not a user error: {raised.value!r}"
    assert "\n" not in str(error)
    return str(error)


def test_unreadable_image_and_empty_folder_name_the_problem(trained, entry_config, tmp_path) -> None:
    ckpt = trained("classification") / "checkpoints" / "last.ckpt"
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    message = user_error_of(lambda: run_predict(entry_config, ckpt, folder, tmp_path / "out", "num_workers=1"))
    assert str(folder / "b.png") in message and "not a readable image" in message
    (tmp_path / "empty").mkdir()
    message = user_error_of(lambda: run_predict(entry_config, ckpt, tmp_path / "empty", tmp_path / "out"))
    assert "holds no image files" in message
    message = user_error_of(lambda: run_predict(entry_config, ckpt, f"{folder}/*.jpg", tmp_path / "out"))
    assert "holds no image files" in message


def test_checkpoint_of_another_task_is_named(trained, entry_config, tmp_path) -> None:
    outside = tmp_path / "segmentation.ckpt"  # away from its run folder: the default (classification) config
    shutil.copy(trained("segmentation") / "checkpoints" / "last.ckpt", outside)
    message = user_error_of(lambda: run_predict(entry_config, outside, tmp_path, tmp_path / "out"))
    assert "is a segmentation checkpoint but the config builds a classification task" in message


def test_hostile_checkpoint_is_refused_before_anything_runs(trained, entry_config, tmp_path) -> None:
    run = trained("classification")
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    marker = tmp_path / "MARKER"
    checkpoint["callbacks"]["Exec"] = Exec(marker)
    trapped = tmp_path / "trapped.ckpt"
    torch.save(checkpoint, trapped)
    # the whole command line once: one error line, exit status 2
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "VIM_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "predict.py"), f"ckpt_path={trapped}", f"input={run}",
                           f"output={tmp_path / 'out'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "builtins.exec" in lines[-1], proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in proc.stderr
    # export.py checks the file with the same function before it builds anything
    cfg = entry_config("export", [f"ckpt_path={trapped}", f"output={tmp_path / 'model.onnx'}"])
    assert "builtins.exec" in user_error_of(lambda: check_weights_source(cfg, "export"))
    assert not marker.exists()


def test_class_names_come_from_the_checkpoint_when_the_data_is_gone(trained, entry_config, tmp_path) -> None:
    cfg = entry_config("predict", [f"ckpt_path={trained('classification') / 'checkpoints' / 'last.ckpt'}",
                                   "input=.", "output=."])
    datamodule = hydra.utils.instantiate(cfg.data, root=str(tmp_path / "moved"))
    assert class_names(load_run(cfg), datamodule) == [str(digit) for digit in range(10)]
