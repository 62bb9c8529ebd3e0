"""Deployment: a trained run loaded for inference, exported (ONNX, torch.export) or run on image files."""

from vision_mamba.deploy.exporting import export_network, set_export_scan
from vision_mamba.deploy.runs import LoadedRun, load_run

__all__ = ["LoadedRun", "export_network", "load_run", "set_export_scan"]
