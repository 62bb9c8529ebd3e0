"""CudaGraphInference: a model's inference forward captured once as a CUDA graph and replayed per call.

A Vim forward launches ~20 kernels per block. At batch 1 the GPU finishes each long before the host has launched
the next, so the latency is the host's (benchmarks/README.md: vim_tiny at 1248 px, batch 1). A captured graph
replays every launch of the forward as one, for a fixed input shape, dtype and autocast setting.
"""

from __future__ import annotations

import torch
from torch import nn


class CudaGraphInference(nn.Module):
    """Inference of `model` through a CUDA graph captured for inputs shaped like `example`.

    Calls copy the input into the graph's static input, replay, and return a copy of the static output (so a
    result survives the next call). The model runs in eval mode, without gradients, under bf16 autocast unless
    autocast_dtype is None. Weights may change between calls (they are read in place); the input shape may not.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, autocast_dtype=torch.bfloat16, warmup: int = 3):
        super().__init__()
        if example.device.type != "cuda":
            raise ValueError(f"CudaGraphInference needs a CUDA input; got one on {example.device}")
        self.model = model.eval()
        self.autocast_dtype = autocast_dtype
        self.static_input = example.detach().clone()
        # warm-up on a side stream (compiles the Triton kernels, builds the route caches), as capture requires
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = self._run()

    def _run(self) -> torch.Tensor:
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None),
        ):
            return self.model(self.static_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise ValueError(
                f"this graph was captured for inputs {tuple(self.static_input.shape)} {self.static_input.dtype}; "
                f"got {tuple(x.shape)} {x.dtype}: capture another CudaGraphInference for that shape"
            )
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output.clone()
