"""src/export.py on the embedded runs: the ONNX file in onnxruntime and the torch.export program against the PyTorch
network eval.py runs (the `torch` scan backend), at two image sizes and two batch sizes each."""

from __future__ import annotations

import json

import hydra
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ROOT
from PIL import Image

from export import export
from vision_mamba.data.images import read_rgb
from vision_mamba.deploy import load_run
from vision_mamba.deploy.exporting import DETECTION_REFUSAL, INPUT_NAME, METADATA_KEY, OUTPUT_NAME
from vision_mamba.utils.errors import find_user_error

# image sides the 8 px patch grids tile: the run's own (digits 32, shapes 64) and a smaller one
SIZES = {"classification": (32, 16), "segmentation": (64, 32)}
# measured: at most 3.4e-7 (float32); the acceptance bound is 1e-4, but a scan that carries the wrong state between
# chunks moves the barely trained segmentation model's logits by only 7e-6
TOLERANCE = 2e-6


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def reference_net(cfg) -> torch.nn.Module:
    """The network eval.py builds for the run, on its own scan backend (`torch` on the CPU), not the export's."""
    net = load_run(cfg).net
    assert {m.scan_backend for m in net.modules() if hasattr(m, "scan_backend")} == {"auto"}
    return net


def reference_outputs(net: torch.nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [net(x) for x in images]


def onnx_outputs(path, images: list[torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME] and [o.name for o in session.get_outputs()] == [
        OUTPUT_NAME]
    return [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x in images]


def program_outputs(path, images: list[torch.Tensor]) -> list[torch.Tensor]:
    program = torch.export.load(path).module()
    with torch.no_grad():
        return [program(x) for x in images]


@pytest.mark.parametrize("kind", list(SIZES))
def test_onnx_and_torch_export_match_pytorch_at_two_sizes_and_batches(kind, trained, entry_config, tmp_path) -> None:
    ckpt = trained(kind) / "checkpoints" / "last.ckpt"
    net = reference_net(entry_config("export", [f"ckpt_path={ckpt}", "output=unused.onnx"]))
    node_counts = []
    for img_size in SIZES[kind]:
        images = [torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(batch))
                  for batch in (1, 4)]
        expected = reference_outputs(net, images)
        for fmt, suffix, outputs in (("onnx", "onnx", onnx_outputs), ("torch_export", "pt2", program_outputs)):
            path = tmp_path / f"{kind}_{img_size}.{suffix}"
            cfg = entry_config("export", [f"ckpt_path={ckpt}", f"format={fmt}", f"output={path}",
                                          f"img_size={img_size}"])
            report = export(cfg)
            assert report["bytes"] == path.stat().st_size > 0
            for got, ref in zip(outputs(path, images), expected):
                assert got.shape == ref.shape
                assert rel_err(got, ref) < TOLERANCE, (fmt, img_size, got.shape[0])
            if fmt == "onnx":
                model = onnx.load(str(path))
                assert {node.domain for node in model.graph.node} <= {""}, "only standard ONNX operators"
                dims = model.graph.input[0].type.tensor_type.shape.dim
                assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, img_size, img_size]
                meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
                assert meta["task"] == kind and meta["input"]["mean"] == list(cfg.data.mean)
                node_counts.append(len(model.graph.node))
    # the scan is a log-step form: more tokens add at most a doubling step per block, never nodes per token
    tokens = [(size // 8) ** 2 + 1 for size in SIZES[kind]]
    blocks = sum(1 for m in net.modules() if hasattr(m, "scan_backend"))
    assert abs(node_counts[0] - node_counts[1]) < abs(tokens[0] - tokens[1]) * blocks, (node_counts, tokens)


def readme_recipe() -> str:
    """The README's Python block that runs an exported classifier without PyTorch (on vim.onnx and photo.jpg)."""
    text = (ROOT / "README.md").read_text()
    return text.split("Without PyTorch", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_cross_scan_model_exports_to_onnx_and_runs_with_the_readme_recipe(trained, entry_config, tmp_path,
                                                                         monkeypatch, capsys) -> None:
    path = tmp_path / "vim.onnx"
    cfg = entry_config("export", [f"ckpt_path={trained('cross') / 'checkpoints' / 'last.ckpt'}", f"output={path}"])
    assert cfg.model.scan == "cross"
    export(cfg)
    net = reference_net(cfg)
    images = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    assert rel_err(onnx_outputs(path, images)[0], reference_outputs(net, images)[0]) < TOLERANCE
    # the README's recipe on a photo that is neither square nor the model's size gives the logits of the network on
    # the evaluation transform of the run's data config
    photo = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    recipe: dict = {}
    capsys.readouterr()  # what the shared run's training printed, if this process trained it
    exec(readme_recipe(), recipe)
    transform = hydra.utils.instantiate(cfg.data).build_transform(is_training=False)
    expected = reference_outputs(net, [transform(read_rgb(tmp_path / "photo.jpg"))[None]])[0]
    assert rel_err(torch.from_numpy(recipe["logits"]), expected) < TOLERANCE
    names = json.loads(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map[METADATA_KEY])["class_names"]
    assert capsys.readouterr().out.strip() == names[int(expected.argmax())]


def test_detection_export_is_refused_with_one_line(trained, entry_config, tmp_path) -> None:
    cfg = entry_config("export", [f"ckpt_path={trained('detection') / 'checkpoints' / 'last.ckpt'}",
                                  f"output={tmp_path / 'det.onnx'}"])
    with pytest.raises(Exception) as refused:
        export(cfg)
    assert str(find_user_error(refused.value)) == DETECTION_REFUSAL, repr(refused.value)
    assert not (tmp_path / "det.onnx").exists()
