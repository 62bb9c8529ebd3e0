"""Exporting a task network at a fixed image size with a dynamic batch axis: ONNX (checked with onnx.checker and
run once in onnxruntime) or a torch.export ExportedProgram, each compared with PyTorch before it is kept."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_mamba.utils.errors import UserError

FORMATS = ("onnx", "torch_export")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# the ONNX metadata key / torch.export extra file that describes the input and output (see `export_metadata`)
METADATA_KEY = "vision_mamba"
# the ONNX tool chain logs every graph rewrite at INFO
for _name in ("onnx_ir", "onnxscript"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# torchvision's detection post-processing, tried with torch 2.14 / torchvision 0.29 (README "Predict and export")
DETECTION_REFUSAL = (
    "detection models cannot be exported: torchvision's Mask R-CNN post-processing (batched NMS, per-image box "
    "filtering) returns data-dependent numbers of boxes, which torch.export cannot trace "
    "(torchvision/ops/boxes.py, _batched_nms_coordinate_trick); run detection with src/predict.py instead"
)


class ExportCheckError(RuntimeError):
    """The exported file does not compute what the PyTorch network computes (a bug in the export, not user input)."""


def check_exportable(kind: str) -> None:
    """Classification and segmentation networks export; detection is refused with the reason."""
    if kind == "detection":
        raise UserError(DETECTION_REFUSAL)


def set_export_scan(net: nn.Module) -> None:
    """Every Vim inside `net` on the `parallel` scan backend: standard tensor ops that ONNX and torch.export trace."""
    for module in net.modules():
        if hasattr(module, "set_scan_backend"):
            module.set_scan_backend("parallel")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| over the whole output, in float64."""
    got, expected = got.double(), expected.double()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def export_metadata(kind: str, img_size: int, mean, std, class_names: list[str] | None, model_name: str,
                    crop_pct: float | None = None, interpolation: str | None = None) -> dict:
    """What a user of the exported file needs beside it: the input it takes (for classification also the
    evaluation's resize: shorter side to img_size / crop_pct, centre crop) and the output it gives."""
    output = {"classification": "(batch, num_classes) logits",
              "segmentation": "(batch, num_classes, H, W) logits of one window (run larger images window by window)"}
    return {
        "task": kind,
        "model": model_name,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, img_size, img_size], "dtype": "float32",
                  "layout": "RGB, (pixel / 255 - mean) / std", "mean": list(mean), "std": list(std),
                  "crop_pct": crop_pct, "interpolation": interpolation},
        "output": {"name": OUTPUT_NAME, "value": output[kind]},
        "class_names": class_names,
    }


def _atomic_target(output: Path):
    """A temporary path beside `output` (renamed onto it once the export checked out)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: torch.export.load reads only files named *.pt2
    fd, tmp = tempfile.mkstemp(prefix=f".{output.stem}.tmp-", suffix=output.suffix, dir=output.parent)
    os.close(fd)
    return Path(tmp)


def export_network(net: nn.Module, kind: str, img_size: int, output: str | os.PathLike, fmt: str,
                   metadata: dict[str, Any], batch_size: int = 2, tolerance: float = 1e-5) -> dict[str, Any]:
    """Export `net` (in eval mode, on the CPU) for (batch, 3, img_size, img_size) float32 images.

    The network is switched to the `parallel` scan, traced at `batch_size` with the batch axis dynamic and run at
    batch_size + 1: the ONNX file as written (checked with onnx.checker, run in onnxruntime), the ExportedProgram as
    saved. Its output must match the network's on its own scan backend (`torch` on the CPU) within `tolerance`
    relative error, else ExportCheckError and nothing is written. Returns the file, its size and the error.
    """
    check_exportable(kind)
    if fmt not in FORMATS:
        raise UserError(f"format={fmt} is not an export format: use one of {', '.join(FORMATS)}")
    output = Path(output)
    if fmt == "torch_export" and output.suffix != ".pt2":
        raise UserError(f"output={output}: torch.export programs are .pt2 files (torch.export.load reads no other)")
    net = net.eval().cpu()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    check = torch.randn(batch_size + 1, 3, img_size, img_size, generator=gen)
    with torch.no_grad():
        expected = net(check)  # on the network's own scan backend: the check covers the parallel scan too
        set_export_scan(net)
        net(example)  # builds the scan routes of this grid outside the trace, where they become constants
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    tmp = _atomic_target(output)
    try:
        if fmt == "torch_export":
            got = _save_program(program, tmp, metadata, check)
        else:
            got = _save_onnx(program, tmp, metadata, check)
        error = relative_error(got, expected)
        if not error <= tolerance:
            raise ExportCheckError(
                f"the exported {fmt} program differs from PyTorch: relative error {error:.2e} > {tolerance:g}"
            )
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return {"output": str(output), "bytes": output.stat().st_size, "relative_error": error,
            "checked_batch": batch_size + 1}


def _save_program(program, path: Path, metadata: dict, check: torch.Tensor) -> torch.Tensor:
    torch.export.save(program, path, extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
    # the program as saved (loading the file back would trace it again: as long as the export itself)
    with torch.no_grad():
        return program.module()(check)


def _save_onnx(program, path: Path, metadata: dict, check: torch.Tensor) -> torch.Tensor:
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError as e:
        raise UserError(f"format=onnx needs {e.name}, which is not installed: pip install -e '.[deploy]'") from None

    onnx_program = torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                     verbose=False)
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    onnx_program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0])
