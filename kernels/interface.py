"""Functional API: selective_scan / multi_route / bidirectional entry points dispatching to ref, torch or triton."""

from __future__ import annotations

import functools
import importlib

import torch

from .parallel_scan import multi_route_selective_scan_parallel, selective_scan_parallel
from .reference import _check_scan_shapes, check_route_shapes, multi_route_selective_scan_ref, selective_scan_ref
from .torch_scan import multi_route_selective_scan_torch, selective_scan_torch

BACKENDS = ("ref", "torch", "parallel", "triton")


@functools.cache
def triton_module(name: str = "triton_scan"):
    """vim_kernels.<name>, a Triton kernel module, imported on first use (TRITON_INTERPRET is read at its import),
    or None when Triton cannot be imported."""
    try:
        return importlib.import_module(f".{name}", __package__)
    except Exception:  # noqa: BLE001 - any import failure means "no Triton backend here"
        return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on `device` (default: CUDA when present): always ref, torch and parallel; triton
    on CUDA."""
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    names = ["ref", "torch", "parallel"]
    if device.type == "cuda" and torch.cuda.is_available() and triton_module() is not None:
        names.append("triton")
    return names


def best_backend(device: torch.device | str | None = None) -> str:
    """ "triton" on CUDA when Triton imports, else "torch"."""
    return "triton" if "triton" in available_backends(device) else "torch"


def _triton_or_raise(x: torch.Tensor, name: str = "triton_scan"):
    """vim_kernels.<name> for tensors like x, or a clear error: no Triton here, or x is on the CPU without the
    interpreter (the route-conv and norm entry points use it too)."""
    mod = triton_module(name)
    if mod is None:
        raise RuntimeError("backend='triton' needs the triton package, which cannot be imported here")
    if x.device.type != "cuda" and not mod._INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch' on CPU")
    return mod


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "triton",
):
    """Selective scan with mamba_ssm's `selective_scan_fn` semantics (see `selective_scan_ref`).

    u, delta, z: (batch, dim, L), any strides (channel-last views of (batch, L, dim) are the fast path);
    A: (dim, N) float32, negative; B, C: (batch, N, L); D, delta_bias: (dim,) float32.
    Returns out (batch, dim, L) in u's dtype; with return_last_state also the last state (batch, dim, N) float32.
    backend: "ref" (sequential oracle), "torch" (time-major recurrence with a hand-written backward, CPU-friendly),
    "parallel" (chunked associative scan of standard ops, for ONNX / torch.export), "triton" (CUDA kernels).
    """
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "torch":
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "parallel":
        return selective_scan_parallel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend != "triton":
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    mod = _triton_or_raise(u)
    return mod.SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state))


def multi_route_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    routes: torch.Tensor,
    delta_softplus: bool = True,
    backend: str = "triton",
    delta_proj: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """R scans over the same L tokens, each visiting them in its own order, merged by mean and gated.

    u, delta: (R, batch, L, dim) in token order; A: (R, dim, N); B, C: (R, batch, L, N); D, delta_bias: (R, dim);
    z: (batch, L, dim) or None; routes: (R, L) int64, routes[r, t] = token visited at step t of route r.
    Returns (batch, L, dim) in token order = mean_r y_r (* silu(z)), where y_r is `selective_scan` (with D skip,
    without gate) of route r's inputs gathered in route order, scattered back to token order.
    The Triton backend runs all routes in one launch and reads through the index map (no permuted copies).

    delta_proj (R, dim, dt_rank), optional: `delta` is then Mamba's low-rank (R, batch, L, dt_rank) input and the
    scan's delta is delta @ delta_proj^T (delta_bias still added in the scan). Where no gradient is needed, the
    Triton forward forms it per step in registers (no (R, batch, L, dim) delta tensor, see
    triton_scan.can_fuse_dt_proj); otherwise it is computed here by a matmul. out (no gradient needed, Triton):
    a contiguous (batch, L, dim) buffer the result is written into; z itself may be given when z is not needed later.
    """
    if delta_proj is not None:
        R, batch, L, dim = u.shape
        rank = delta.shape[-1]
        if tuple(delta.shape) != (R, batch, L, rank) or tuple(delta_proj.shape) != (R, dim, rank):
            raise ValueError(
                f"with delta_proj, delta must be (R, batch, L, dt_rank) and delta_proj (R, dim, dt_rank) with "
                f"(R, batch, L, dim) = {(R, batch, L, dim)}; got {tuple(delta.shape)} and {tuple(delta_proj.shape)}"
            )
        if backend == "triton" and not _grad_needed(u, delta, A, B, C, D, z, delta_bias, delta_proj):
            mod = _triton_or_raise(u)
            if mod.can_fuse_dt_proj(batch, dim, R, L, A.shape[-1], rank):
                check_route_shapes(u, u, A, B, C, D, z, delta_bias, routes)
                return mod.multi_route_scan_forward(
                    u, delta, A, B, C, D, z, delta_bias, routes, bool(delta_softplus), delta_proj, out
                )
        # (R, batch, L, dim); in delta's dtype (under autocast both are cast to its dtype anyway)
        delta = torch.matmul(delta, delta_proj.to(delta.dtype).transpose(-1, -2).unsqueeze(1))
    if out is not None and (backend != "triton" or _grad_needed(u, delta, A, B, C, D, z, delta_bias)):
        raise ValueError("multi_route_selective_scan: out= is for the Triton backend without gradients")
    if backend == "ref":
        return multi_route_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus)
    if backend == "torch":
        return multi_route_selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus)
    if backend == "parallel":
        return multi_route_selective_scan_parallel(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus)
    if backend != "triton":
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    check_route_shapes(u, delta, A, B, C, D, z, delta_bias, routes)
    mod = _triton_or_raise(u)
    if out is not None:
        return mod.multi_route_scan_forward(
            u, delta, A, B, C, D, z, delta_bias, routes, bool(delta_softplus), None, out
        )
    return mod.MultiRouteScanFn.apply(u, delta, A, B, C, D, z, delta_bias, routes, bool(delta_softplus))


def project_scan_inputs(u: torch.Tensor, weight: torch.Tensor, dt_rank: int, d_state: int, backend: str = "triton"):
    """Mamba's x_proj for every route: u (R, batch, L, E) @ weight (R, dt_rank + 2 N, E)^T (rows [dt | B | C]).

    Returns the views dt_low (R, batch, L, dt_rank), B and C (R, batch, L, N). With the Triton backend, no gradient
    needed and a shape whose forward forms delta in the kernel (triton_scan.can_fuse_dt_proj), the matmul writes the
    scan's packed row layout directly (triton_scan.packed_projection_weight) and the forward-only
    `multi_route_selective_scan(..., delta_proj=...)` then reads these views with no copy.
    """
    if backend == "triton" and not _grad_needed(u, weight):
        mod = _triton_or_raise(u)
        R, batch, L, E = u.shape
        if mod.can_fuse_dt_proj(batch, E, R, L, d_state, dt_rank):
            w = mod.packed_projection_weight(weight, d_state, dt_rank)
            rows = torch.matmul(u, w.unsqueeze(1).transpose(-1, -2))
            c0, dt0 = mod.packed_row_offsets(d_state)
            return rows[..., dt0 : dt0 + dt_rank], rows[..., :d_state], rows[..., c0 : c0 + d_state]
    x_dbl = torch.matmul(u, weight.unsqueeze(1).transpose(-1, -2))
    return torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)


def bidirectional_selective_scan(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool = True, backend: str = "triton"
) -> torch.Tensor:
    """Vim's bidirectional scan: `multi_route_selective_scan` with routes [arange(L), arange(L).flip(0)].

    Same tensors as the multi-route entry with R = 2 (index 0: forward direction, 1: backward direction).
    Equivalent to Vim v2's (y_fwd + flip(y_bwd computed on the flipped inputs)) / 2 * silu(z): the reversed route
    visits the tokens last-to-first and scatters each output back to its token, which is that flip, undone.
    """
    if u.shape[0] != 2:
        raise ValueError(f"bidirectional_selective_scan takes R = 2 routes; got u of shape {tuple(u.shape)}")
    L = u.shape[2]
    fwd = torch.arange(L, device=u.device)
    routes = torch.stack([fwd, fwd.flip(0)])
    return multi_route_selective_scan(u, delta, A, B, C, D, z, delta_bias, routes, delta_softplus, backend)
