"""The backends of vim_kernels and which of them can run where: ref and torch everywhere, triton on CUDA.

The Triton modules are imported here, statically, when the `triton` package is installed: they register the
`vim::` custom ops. Only a missing `triton` turns the Triton backend off; any other error in those modules is raised
at `import vim_kernels` (a broken kernel must fail loudly, not turn into a silent fallback). Kernels are compiled
for CUDA, or interpreted on CPU tensors when TRITON_INTERPRET=1 is set before the import (the test suite's way).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("ref", "torch", "triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True
    from . import mixer_ops, scan_ops, triton_norm, triton_route_conv  # noqa: F401  (register the vim:: ops)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on `device` (default: CUDA when present): always ref and torch; triton on CUDA."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ["ref", "torch", "triton"] if device.type == "cuda" and HAS_TRITON else ["ref", "torch"]


@torch.compiler.assume_constant_result
def best_backend(device: torch.device | str | None = None) -> str:
    """The default backend for tensors on `device` (default: CUDA when present): "triton" on CUDA, "torch"
    elsewhere. On CUDA without the triton package this is an error (install triton, or ask for the torch backend
    explicitly), not a fallback. A constant to torch.compile (resolved once, while tracing)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return "torch"
    if not HAS_TRITON:
        raise RuntimeError(
            "vim_kernels: scan_backend='auto' on CUDA needs the triton package (pip install triton), or choose "
            "scan_backend='torch' explicitly"
        )
    return "triton"


def require_triton(x: torch.Tensor) -> None:
    """A clear error unless the Triton kernels can run on tensors like x: no triton here, or x on the CPU without
    the interpreter."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed here")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch' on CPU")
