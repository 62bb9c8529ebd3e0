"""Yardsticks for the model tests, independent of the code under test: relative error, and timm's pos-embed resize."""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64, for one whole tensor (an output, one parameter's gradient).

    A bug scales, zeroes or scrambles a tensor and shows as an error of order 1; rounding differences stay near
    the precision's epsilon. Non-finite values and an all-zero reference (which would make any x pass) fail.
    """
    assert x.shape == ref.shape, (tuple(x.shape), tuple(ref.shape))
    assert torch.isfinite(x).all(), "non-finite values"
    x, ref = x.detach().double(), ref.detach().double()
    assert ref.norm() > 0, "the reference is all zeros: compare something that carries a signal"
    return ((x - ref).norm() / ref.norm()).item()


def split_class_row(pe: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(class row, patch rows in row-major order) of a pos_embed whose class row sits at index H * W // 2."""
    mid = grid[0] * grid[1] // 2
    return pe[:, mid], torch.cat([pe[:, :mid], pe[:, mid + 1 :]], dim=1)


def timm_resize(pe: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """A middle-class-token pos_embed resized with timm: its bicubic resample of the patch rows, the class row put
    back in the middle of the new grid."""
    cls, patches = split_class_row(pe, old)
    patches = resample_abs_pos_embed(patches, new_size=list(new), old_size=list(old), num_prefix_tokens=0,
                                     antialias=False)
    mid = new[0] * new[1] // 2
    return torch.cat([patches[:, :mid], cls[:, None], patches[:, mid:]], dim=1)
