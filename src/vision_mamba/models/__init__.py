"""Plain nn.Modules: VisionMamba and its timm-registered variants (importing this package registers them)."""

from vision_mamba.models.checkpoints import (
    CheckpointError,
    checkpoint_filter_fn,
    load_pretrained,
    load_safetensors,
    save_safetensors,
)
from vision_mamba.models.cuda_graph import CudaGraphInference
from vision_mamba.models.mixer import SCAN_PATTERNS, MultiRouteMamba, ScanPattern, register_scan_pattern
from vision_mamba.models.vim import VisionMamba

__all__ = [
    "VisionMamba",
    "CudaGraphInference",
    "MultiRouteMamba",
    "ScanPattern",
    "SCAN_PATTERNS",
    "register_scan_pattern",
    "CheckpointError",
    "load_pretrained",
    "load_safetensors",
    "save_safetensors",
    "checkpoint_filter_fn",
]
