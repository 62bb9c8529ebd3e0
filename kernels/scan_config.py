"""ScanConfig, the launch choices of the Triton scan, and select_config, the default choice for a shape.

Every program of the scan kernels is one warp holding 32 channels (a channel per lane, its states in that thread),
so the grid is (dim / 32, batch, routes). Two regimes:
- large grids (at least MIN_PROGRAMS_PER_SM programs per multiprocessor): the one-step forward and backward over the
  whole sequence; the forward saves the state every `chunk` steps for the backward (4, or 8 when the saved states
  would exceed STATE_BUDGET bytes: half the memory for a little more recomputation).
- small grids (long L, small batch): each one-step program waits on its loads, so what the grid needs is more
  programs in flight: L is split into segments of `seg` steps, one program per segment (two launches, see
  scan_fwd._scan_fwd_split_kernel and scan_bwd), with an L2 prefetch `prefetch` steps ahead. Sequences no longer
  than one segment run the one-step kernels, with the prefetch.
The backward works in sub-chunks of 4 steps (`chunk // subs`): its unrolled body then fits a cap of `max_regs`
registers per thread, which keeps more programs resident per multiprocessor than the spill-free allocation would.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

BLOCK_D = 32  # channels per program: one warp, a channel per lane (the backward's lane reduce-scatter needs 32)
NUM_WARPS = 1
MIN_PROGRAMS_PER_SM = 8
STATE_BUDGET = 320 * 2**20  # bytes of saved chunk states above which the chunk grows from 4 to 8 steps
SEGMENT = 256
SUB_CHUNK = 4
MAX_REGS = 168  # one-warp backward programs: 12 resident per multiprocessor instead of 8 without the cap
DT_PROJ_MAX_RANK = 16  # the forward-only scan forms delta = dt_proj @ dt_low in registers up to this rank


@dataclass(frozen=True)
class ScanConfig:
    """One launch choice of the scan kernels. `fwd` / `bwd`: "seq" (one program per channel block over all of L) or
    "split" (one program per segment of `seg` steps); `chunk`: steps between the states the forward saves for the
    backward; `subs`: backward sub-chunks per chunk; `prefetch`: L2 prefetch distance of the forward in steps (0:
    off); `max_regs`: register cap of the backward (None: the compiler's choice); `dt_proj_max_rank`: the largest
    dt rank the forward-only scan forms delta for in the kernel (0: never)."""

    fwd: str = "seq"
    bwd: str = "seq"
    chunk: int = 4
    subs: int = 1
    seg: int = SEGMENT
    prefetch: int = 0
    max_regs: int | None = MAX_REGS
    dt_proj_max_rank: int = DT_PROJ_MAX_RANK

    def __post_init__(self):
        if self.fwd not in ("seq", "split") or self.bwd not in ("seq", "split"):
            raise ValueError(f"ScanConfig: fwd and bwd must be 'seq' or 'split'; got {self.fwd!r}, {self.bwd!r}")
        if self.chunk < 4 or self.chunk % 4:
            raise ValueError(f"ScanConfig: chunk must be a multiple of 4 (the forward's steps per iteration); got {self.chunk}")
        if self.subs < 1 or self.chunk % self.subs:
            raise ValueError(f"ScanConfig: subs={self.subs} must divide chunk={self.chunk} into sub-chunks")
        if self.seg < self.chunk or self.seg % self.chunk:
            raise ValueError(f"ScanConfig: seg={self.seg} must be a multiple of chunk={self.chunk}")
        if self.prefetch < 0 or self.dt_proj_max_rank < 0:
            raise ValueError("ScanConfig: prefetch and dt_proj_max_rank must be >= 0")

    def encode(self) -> str:
        """The string the custom ops take (their schemas hold no dataclasses): `key=value,...`; see decode."""
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def decode(text: str) -> ScanConfig:
        fields = dict(item.split("=", 1) for item in text.split(","))
        ints = {k: (None if v == "None" else int(v)) for k, v in fields.items() if k not in ("fwd", "bwd")}
        return ScanConfig(fwd=fields["fwd"], bwd=fields["bwd"], **ints)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter (CPU tensors), or a plan made without the GPU: the choices of an H100 or H200


def next_pow2(n: int) -> int:
    return 1 << max(1, (n - 1).bit_length())


@functools.lru_cache(maxsize=256)
def _select(batch: int, dim: int, routes: int, length: int, d_state: int, needs_grad: bool, device) -> ScanConfig:
    programs = batch * routes * -(-dim // BLOCK_D)
    rank = DT_PROJ_MAX_RANK if not needs_grad else 0
    if programs >= MIN_PROGRAMS_PER_SM * _multiprocessors(device):
        saved = routes * batch * -(-length // 4) * next_pow2(d_state) * dim * 4
        chunk = 4 if saved <= STATE_BUDGET else 8
        return ScanConfig("seq", "seq", chunk, chunk // SUB_CHUNK, SEGMENT, 0, MAX_REGS, rank)
    kind = "split" if length > SEGMENT else "seq"
    return ScanConfig(kind, kind, 8, 8 // SUB_CHUNK, SEGMENT, 16, MAX_REGS, rank)


def select_config(
    batch: int, dim: int, routes: int, length: int, d_state: int, needs_grad: bool, device: torch.device | str
) -> ScanConfig:
    """The default launch choice for a scan of `routes` routes over (batch, length, dim) with d_state states; a pure
    function of its arguments (see the module docstring)."""
    return _select(batch, dim, routes, length, d_state, bool(needs_grad), torch.device(device))
