"""onnxruntime (CPU) against PyTorch (CPU, the `torch` scan backend) for vim_tiny: images/s and the ONNX file's size.

    python benchmarks/deploy.py                          # vim_tiny at 224, batch 1 and 32, one thread each
    python benchmarks/deploy.py --threads 2 --batch 1 8  # other settings
    python benchmarks/deploy.py --quick                  # a smoke run (32 px, batch 1 and 2), not a record

The ONNX file is what `src/export.py format=onnx` writes (the `parallel` scan backend, checked against PyTorch);
both runtimes get the same thread count and the same random weights and images. One thread by default: on a small
machine shared with other jobs, two threads per process ran vim_tiny 3-10x slower than one (the project's CPU
default, extras.cpu_threads). The record, benchmarks/results/deploy_cpu.json, carries the CPU model and core count
(common.environment) and the 1-minute load average before and after the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_rows, time_ms, write_result  # noqa: E402

from vision_mamba.deploy.exporting import INPUT_NAME, export_metadata, export_network, relative_error  # noqa: E402
from vision_mamba.models.factory import create_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vim_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1, help="threads for both runtimes")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per setting (median)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 32 px, batch 1 and 2, one timed call")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.img_size, args.batch, args.iters = 32, [1, 2], 1

    import onnxruntime as ort

    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model(args.model, img_size=args.img_size).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        meta = export_metadata("classification", args.img_size, (0.5,) * 3, (0.5,) * 3, None, args.model)
        report = export_network(model, "classification", args.img_size, path, "onnx", meta)
        model.set_scan_backend("torch")  # the export switched it to `parallel`
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        rows = []
        for batch in args.batch:
            images = torch.randn(batch, 3, args.img_size, args.img_size)
            feed = {INPUT_NAME: images.numpy()}
            with torch.inference_mode():
                expected = model(images)
                torch_ms = time_ms(lambda images=images: model(images), warmup=1, iters=args.iters)
            onnx_ms = time_ms(lambda feed=feed: session.run(None, feed), warmup=1, iters=args.iters)
            rows.append({
                "model": args.model, "img_size": args.img_size, "batch": batch, "threads": args.threads,
                "pytorch_img_s": batch * 1e3 / torch_ms, "onnxruntime_img_s": batch * 1e3 / onnx_ms,
                "pytorch_ms": torch_ms, "onnxruntime_ms": onnx_ms,
                "onnx_vs_pytorch_rel_diff": relative_error(torch.from_numpy(session.run(None, feed)[0]), expected),
            })  # fmt: skip
    print_rows(rows, ["batch", "pytorch_img_s", "onnxruntime_img_s", "onnx_vs_pytorch_rel_diff"])
    summary = {
        "what": f"{args.model} at {args.img_size}, float32, CPU: PyTorch eager (scan backend torch) vs onnxruntime "
        "on the file src/export.py writes (scan backend parallel); images/s = batch / median call time",
        "onnxruntime": ort.__version__,
        "onnx_bytes": report["bytes"],
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    path = write_result("deploy", rows, args.out, summary=summary, quick=args.quick)
    print(f"ONNX file: {report['bytes'] / 2**20:.1f} MiB; record: {path}")


if __name__ == "__main__":
    main()
