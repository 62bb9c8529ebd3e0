"""CudaGraphInference without a GPU: its refusal of CPU input, and its call contract around a stand-in graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vision_mamba.models import CudaGraphInference


def test_a_cpu_example_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CudaGraphInference needs a CUDA input; got one on cpu"):
        CudaGraphInference(nn.Linear(4, 2), torch.randn(1, 4))


class ReplayedForward:
    """Stands in for a captured torch.cuda.CUDAGraph: replay() recomputes the captured call into the static output."""

    def __init__(self, graphed: CudaGraphInference) -> None:
        self.graphed, self.replays = graphed, 0

    def replay(self) -> None:
        self.replays += 1
        with torch.no_grad():
            self.graphed.static_output.copy_(self.graphed.model(self.graphed.static_input))


def graphed_on_cpu(model: nn.Module, example: torch.Tensor) -> CudaGraphInference:
    """The object __init__ builds on a GPU, with the graph replaced by ReplayedForward (capture needs CUDA)."""
    graphed = CudaGraphInference.__new__(CudaGraphInference)
    nn.Module.__init__(graphed)
    graphed.model, graphed.autocast_dtype = model.eval(), None
    graphed.static_input = example.detach().clone()
    with torch.no_grad():
        graphed.static_output = model(graphed.static_input)
    graphed.graph = ReplayedForward(graphed)
    return graphed


def test_calls_copy_in_replay_and_return_results_that_survive_the_next_call() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    graphed = graphed_on_cpu(model, torch.zeros(2, 4))
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    out1 = graphed(x1)
    out2 = graphed(x2)
    assert graphed.graph.replays == 2
    with torch.no_grad():
        assert torch.equal(out1, model(x1)) and torch.equal(out2, model(x2))  # out1 not overwritten by the replay
    assert out2.data_ptr() != graphed.static_output.data_ptr()


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.zeros(2, 5), torch.zeros(2, 4, dtype=torch.float64)],
                         ids=["batch", "width", "dtype"])
def test_another_shape_or_dtype_is_refused_before_touching_the_graph(bad) -> None:
    graphed = graphed_on_cpu(nn.Linear(4, 3), torch.zeros(2, 4))
    static = graphed.static_input.clone()
    with pytest.raises(ValueError, match=r"captured for inputs \(2, 4\) torch.float32; got .*capture another"):
        graphed(bad)
    assert graphed.graph.replays == 0 and torch.equal(graphed.static_input, static)
