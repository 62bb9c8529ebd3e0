"""The multi-route Mamba mixer (Vim's bimamba v2, generalised): a ScanPattern gives index routes + a merge rule.

A *route* is an order in which the selective scan visits the L tokens of one image (patch tokens plus the middle
class token). Every route has its own depthwise causal conv1d, x_proj, dt_proj, A_log and D; the conv and the scan
run along the route order, the route outputs are brought back to token order and merged by their mean, gated by
silu(z), and projected by one out_proj. Vim's `bidirectional` pattern is two routes: forward and reversed.

Class token in multi-route patterns: the official model inserts the class token into the row-major patch sequence
at index M // 2 (M patches), so the forward route visits it at step M // 2. Every *forward* route of a pattern keeps
that rule: it is inserted into the route's own patch order at step M // 2 (for the column-major route: the middle of
the column-major sequence). Every reversed route is the exact reverse of its forward twin, so it visits the class
token at step L - 1 - M // 2. In token order the class token always sits at index M // 2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import vim_kernels

from vision_mamba.models import scan

__all__ = [
    "ScanPattern",
    "ScanRoutes",
    "MultiRouteMamba",
    "SCAN_PATTERNS",
    "register_scan_pattern",
    "get_scan_pattern",
]


# --------------------------------------------------------------------------------------------------------------------
# Routes over the token grid
# --------------------------------------------------------------------------------------------------------------------


def row_major(grid_h: int, grid_w: int, device: torch.device | None = None) -> torch.Tensor:
    """Patch indices visited row by row (the official Vim order)."""
    return torch.arange(grid_h * grid_w, device=device)


def column_major(grid_h: int, grid_w: int, device: torch.device | None = None) -> torch.Tensor:
    """Patch indices visited column by column (patch index = row * grid_w + col)."""
    return torch.arange(grid_h * grid_w, device=device).view(grid_h, grid_w).t().reshape(-1)


def with_class_token(patch_order: torch.Tensor, cls_pos: int | None) -> torch.Tensor:
    """Turn an order over patches into an order over tokens, visiting the class token at step `cls_pos`.

    Tokens are the patches with the class token inserted at index cls_pos, so patch p is token p + (p >= cls_pos).
    """
    if cls_pos is None:
        return patch_order
    tokens = patch_order + (patch_order >= cls_pos).long()
    cls = torch.full((1,), cls_pos, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([tokens[:cls_pos], cls, tokens[cls_pos:]])


def _forward_and_reversed(*orders: Callable[..., torch.Tensor]):
    """Route builder: each patch order followed by its exact reverse (class token included)."""

    def build(grid_h: int, grid_w: int, cls_pos: int | None, device: torch.device | None = None) -> torch.Tensor:
        routes = []
        for order in orders:
            forward = with_class_token(order(grid_h, grid_w, device), cls_pos)
            routes += [forward, forward.flip(0)]
        return torch.stack(routes)

    return build


class ScanRoutes(NamedTuple):
    """The routes of one pattern for one token grid, on one device.

    index[r, t] is the token visited at step t of route r; inverse[r, i] is the step at which route r visits token i
    (int64; index32 and inverse32 are the same maps as int32, what the route-conv kernels gather with).
    kinds[r] is "identity", "reverse" or "gather": the torch backend runs the first two without a permuted copy.
    """

    index: torch.Tensor
    inverse: torch.Tensor
    index32: torch.Tensor
    inverse32: torch.Tensor
    kinds: tuple[str, ...]

    @property
    def num_routes(self) -> int:
        return self.index.shape[0]


@dataclass(frozen=True, eq=False)
class ScanPattern:
    """Index routes over the token grid plus the rule that merges the route outputs.

    `suffixes[r]` names route r's parameters (conv1d{s}, x_proj{s}, dt_proj{s}, A{s}_log, D{s}); route 0 has the
    empty suffix, so a one-route pattern is plain Mamba and `bidirectional` keeps the official Vim names.
    `build(grid_h, grid_w, cls_pos, device)` returns the (R, L) index routes, made with tensor ops on `device`.
    """

    name: str
    suffixes: tuple[str, ...]
    build: Callable[..., torch.Tensor]
    merge: str = "mean"

    def __post_init__(self):
        if self.merge != "mean":
            raise ValueError(f"scan pattern {self.name!r}: only the 'mean' merge is implemented, got {self.merge!r}")
        if not self.suffixes or self.suffixes[0] != "" or len(set(self.suffixes)) != len(self.suffixes):
            raise ValueError(f"scan pattern {self.name!r}: suffixes must be unique and start with ''")

    @property
    def num_routes(self) -> int:
        return len(self.suffixes)

    def routes(self, grid_h: int, grid_w: int, cls_pos: int | None, device: torch.device) -> ScanRoutes:
        """Routes for a grid: cached per grid, class-token position and device; under torch.compile built by tensor
        ops on the device inside the graph (no host-to-device copy, so CUDA graphs can capture it)."""
        if torch.compiler.is_compiling():
            index = self.build(grid_h, grid_w, cls_pos, device)
            return self._routes_of(index, route_kinds(self, grid_h, grid_w, cls_pos))
        return self._cached_routes(grid_h, grid_w, cls_pos, torch.device(device))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - patterns are module-level singletons
    def _cached_routes(self, grid_h: int, grid_w: int, cls_pos: int | None, device: torch.device) -> ScanRoutes:
        # built outside inference mode: the cache outlives the call, and an inference tensor cached during
        # validation could not be saved for backward in the next training step
        with torch.inference_mode(False):
            index = self._checked_index(grid_h, grid_w, cls_pos)
            kinds = route_kinds(self, grid_h, grid_w, cls_pos)
            return self._routes_of(index.to(device), kinds)

    @staticmethod
    def _routes_of(index, kinds) -> ScanRoutes:
        inverse = torch.argsort(index, dim=1)
        i32 = torch.int32
        return ScanRoutes(index, inverse, index.to(i32), inverse.to(i32), kinds)

    def _checked_index(self, grid_h: int, grid_w: int, cls_pos: int | None) -> torch.Tensor:
        index = self.build(grid_h, grid_w, cls_pos, torch.device("cpu")).long()
        length = grid_h * grid_w + (cls_pos is not None)
        if index.shape != (self.num_routes, length):
            raise ValueError(
                f"scan pattern {self.name!r} built routes of shape {tuple(index.shape)}, "
                f"expected {(self.num_routes, length)}"
            )
        ar = torch.arange(length, device=index.device)  # the index's, not the default device (set_default_device)
        if not all(torch.equal(r.sort().values, ar) for r in index):
            raise ValueError(f"scan pattern {self.name!r}: every route must be a permutation of the {length} tokens")
        return index



@torch.compiler.assume_constant_result
def route_kinds(pattern: ScanPattern, grid_h: int, grid_w: int, cls_pos: int | None) -> tuple[str, ...]:
    """identity / reverse / gather per route of a pattern on a grid: Python constants, so torch.compile branches on
    them freely (it calls this once while tracing)."""
    return _route_kinds(pattern, grid_h, grid_w, cls_pos)


@functools.lru_cache(maxsize=256)
def _route_kinds(pattern: ScanPattern, grid_h: int, grid_w: int, cls_pos: int | None) -> tuple[str, ...]:
    index = pattern._checked_index(grid_h, grid_w, cls_pos)
    ar = torch.arange(index.shape[1], device=index.device)
    return tuple("identity" if torch.equal(r, ar) else "reverse" if torch.equal(r, ar.flip(0)) else "gather" for r in index)


SCAN_PATTERNS: dict[str, ScanPattern] = {}


def register_scan_pattern(pattern: ScanPattern) -> ScanPattern:
    """Add a pattern to the registry (new patterns, e.g. zig-zag, need no block or mixer change)."""
    if pattern.name in SCAN_PATTERNS:
        raise ValueError(f"scan pattern {pattern.name!r} is already registered")
    SCAN_PATTERNS[pattern.name] = pattern
    return pattern


def get_scan_pattern(name: str | ScanPattern) -> ScanPattern:
    if isinstance(name, ScanPattern):
        return name
    if name not in SCAN_PATTERNS:
        raise ValueError(f"unknown scan pattern {name!r}; registered: {', '.join(sorted(SCAN_PATTERNS))}")
    return SCAN_PATTERNS[name]


register_scan_pattern(ScanPattern("bidirectional", ("", "_b"), _forward_and_reversed(row_major)))
register_scan_pattern(ScanPattern("cross", ("", "_b", "_c", "_cb"), _forward_and_reversed(row_major, column_major)))


# --------------------------------------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------------------------------------


def _a_log_name(suffix: str) -> str:
    return f"A{suffix}_log" if suffix else "A_log"  # official spelling: A_log, A_b_log


class MultiRouteMamba(nn.Module):
    """Mamba mixer scanning the tokens along every route of a ScanPattern (bimamba v2 for `bidirectional`).

    in_proj (dim -> 2E, no bias) gives x and z. Per route: depthwise causal conv1d along the route + SiLU, x_proj
    (E -> dt_rank + 2N, no bias), dt_proj (dt_rank -> E; its bias is the scan's delta_bias, softplus inside the scan),
    A = -exp(A_log), D. out = out_proj(mean_r(y_r) * silu(z)).

    path="fused": on the triton backend the whole interior is one fused custom op (vim_kernels.mamba_inner with
    autograd, memory-lean: its backward recomputes the convs, delta and the scan's states unless save_scan_states;
    without gradients vim_kernels.mamba_mixer_inference, in_proj and out_proj included); on the torch and ref
    backends the same function in PyTorch ops around one multi-route scan. path="reference" permutes into each
    route's order, scans it alone and un-permutes (the oracle for the fused path).
    """

    def __init__(
        self,
        dim: int,
        pattern: str | ScanPattern = "bidirectional",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        num_layers: int = 1,
        scan_backend: str = "auto",
        path: str = "fused",
        save_scan_states: bool = False,
    ):
        super().__init__()
        self.pattern = get_scan_pattern(pattern)
        self.dim, self.d_state, self.d_conv = dim, d_state, d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.num_layers = num_layers
        self.scan_backend = scan.check_backend(scan_backend)
        self.path = path
        self.save_scan_states = save_scan_states
        self._packed = None  # (key, the inference kernel's weights): see _inference_weights

        e = self.d_inner
        self.in_proj = nn.Linear(dim, 2 * e, bias=False)
        for s in self.pattern.suffixes:
            self.add_module(f"conv1d{s}", nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=True))
            self.add_module(f"x_proj{s}", nn.Linear(e, self.dt_rank + 2 * d_state, bias=False))
            self.add_module(f"dt_proj{s}", nn.Linear(self.dt_rank, e, bias=True))
            self.register_parameter(_a_log_name(s), nn.Parameter(torch.empty(e, d_state)))
            self.register_parameter(f"D{s}", nn.Parameter(torch.empty(e)))
        self.out_proj = nn.Linear(e, dim, bias=False)
        self.reset_parameters()

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str):
        if value not in ("fused", "reference"):
            raise ValueError(f"mixer path must be 'fused' or 'reference', got {value!r}")
        self._path = value

    # ---- parameters ------------------------------------------------------------------------------------------------
    def route_params(self, r: int) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]:
        """(conv1d, x_proj, dt_proj, A_log, D) of route r."""
        s = self.pattern.suffixes[r]
        return (
            getattr(self, f"conv1d{s}"),
            getattr(self, f"x_proj{s}"),
            getattr(self, f"dt_proj{s}"),
            getattr(self, _a_log_name(s)),
            getattr(self, f"D{s}"),
        )

    def no_weight_decay_names(self) -> set[str]:
        """Names (relative to this module) of the SSM parameters kept out of weight decay: every A_log and D."""
        return {n for s in self.pattern.suffixes for n in (_a_log_name(s), f"D{s}")}

    @torch.no_grad()
    def reset_parameters(self):
        """Mamba init: dt bias = softplus^-1(log-uniform dt), dt weight U(+-dt_rank^-0.5), S4D-real A, D = 1,
        out_proj kaiming-uniform scaled by 1/sqrt(num_layers) (the official GPT-2 style rescale)."""
        e, n = self.d_inner, self.d_state
        for r in range(self.pattern.num_routes):
            conv, _, dt_proj, a_log, d = self.route_params(r)
            std = self.dt_rank**-0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(
                torch.rand(e, device=dt_proj.bias.device) * (math.log(self.dt_max) - math.log(self.dt_min))
                + math.log(self.dt_min)
            ).clamp(min=self.dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            a_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=a_log.device)).expand(e, n))
            d.fill_(1.0)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight /= math.sqrt(self.num_layers)

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, routes: ScanRoutes) -> torch.Tensor:
        """hidden (batch, L, dim) in token order -> (batch, L, dim)."""
        if routes.num_routes != self.pattern.num_routes:
            raise ValueError(
                f"got {routes.num_routes} routes for a {self.pattern.name!r} mixer ({self.pattern.num_routes} routes)"
            )
        backend = scan.resolve_backend(self.scan_backend, hidden.device)
        if self.path == "fused" and backend == "triton":
            if not torch.is_grad_enabled():
                weights = self._inference_weights(hidden.dtype)
                return vim_kernels.mamba_mixer_inference(hidden, weights, routes.index, routes.index32, routes.inverse32)
            x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, L, E) each, channel-last
            y = vim_kernels.mamba_inner(
                x, z, *self._stacked_params(), routes.index, routes.index32, routes.inverse32, self.save_scan_states
            )
            return self.out_proj(y)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        if self.path == "fused":
            return self.out_proj(self._scan_decomposed(x, z, routes, backend))
        return self.out_proj(self._scan_reference(x, z, routes, backend))

    def _stacked_params(self) -> tuple[torch.Tensor, ...]:
        """Every route's (conv weight (R, E, K), conv bias, x_proj (R, rank + 2N, E), dt_proj (R, E, rank),
        dt_proj bias, A_log (R, E, N), D), stacked over routes as the fused kernels take them."""
        params = [self.route_params(r) for r in range(self.pattern.num_routes)]
        return (
            torch.stack([p[0].weight.squeeze(1) for p in params]),
            torch.stack([p[0].bias for p in params]),
            torch.stack([p[1].weight for p in params]),
            torch.stack([p[2].weight for p in params]),
            torch.stack([p[2].bias for p in params]),
            torch.stack([p[3] for p in params]),
            torch.stack([p[4] for p in params]),
        )

    def _inference_weights(self, dtype: torch.dtype):
        """The weights in the inference kernel's layouts (vim_kernels.pack_mixer_weights), kept until a weight
        changes (its storage or its version counter) or the activation dtype does: eagerly, packing them per call
        would cost more launches than the mixer itself. Under torch.compile they are packed in the graph."""
        def pack():
            conv_w, conv_b, x_proj, dt_proj, dt_bias, a_log, d = self._stacked_params()
            return vim_kernels.pack_mixer_weights(
                self.in_proj.weight, conv_w, conv_b, x_proj, dt_proj, dt_bias, a_log, d, self.out_proj.weight, dtype
            )

        if torch.compiler.is_compiling():
            return pack()
        key = (dtype, *((p.data_ptr(), p._version) for p in self.parameters()))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack())
        return self._packed[1]

    def _route_conv(self, xt: torch.Tensor, r: int, routes: ScanRoutes) -> torch.Tensor:
        """Depthwise conv of route r, causal along the route, returned in token order. xt: (batch, E, L)."""
        conv = self.route_params(r)[0]
        k, length = self.d_conv, xt.shape[-1]
        kind = routes.kinds[r]
        if kind == "identity":
            return F.conv1d(xt, conv.weight, conv.bias, padding=k - 1, groups=self.d_inner)[..., :length]
        if kind == "reverse":  # causal along the reversed sequence == anti-causal with the flipped kernel
            return F.conv1d(xt, conv.weight.flip(-1), conv.bias, padding=k - 1, groups=self.d_inner)[..., k - 1 :]
        xr = xt[:, :, routes.index[r]]
        out = F.conv1d(xr, conv.weight, conv.bias, padding=k - 1, groups=self.d_inner)[..., :length]
        return out[:, :, routes.inverse[r]]

    def _scan_decomposed(self, x: torch.Tensor, z: torch.Tensor, routes: ScanRoutes, backend: str) -> torch.Tensor:
        """The fused path's function in PyTorch ops around one multi-route scan (the ref and torch backends):
        every route's conv + SiLU (F.conv1d; identity and reversed routes without a permuted copy), x_proj and
        dt_proj as batched matmuls over the routes, in token order."""
        num_routes = self.pattern.num_routes
        xt = x.transpose(1, 2)
        # the stack writes the transposed outputs contiguously: u (R, batch, L, E), channel-last
        u = F.silu(torch.stack([self._route_conv(xt, r, routes).transpose(1, 2) for r in range(num_routes)]))
        params = [self.route_params(r) for r in range(num_routes)]
        w_x = torch.stack([p[1].weight for p in params])  # (R, dt_rank + 2N, E)
        x_dbl = torch.matmul(u, w_x.unsqueeze(1).transpose(-1, -2))
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        w_dt = torch.stack([p[2].weight for p in params])  # (R, E, dt_rank)
        delta = torch.matmul(dt, w_dt.unsqueeze(1).transpose(-1, -2))  # (R, batch, L, E); bias: delta_bias
        a = -torch.exp(torch.stack([p[3] for p in params]).float())
        d = torch.stack([p[4] for p in params]).float()
        delta_bias = torch.stack([p[2].bias for p in params]).float()
        return scan.multi_route_scan(u, delta, a, b, c, d, z, delta_bias, routes.index, backend)

    def _scan_reference(self, x: torch.Tensor, z: torch.Tensor, routes: ScanRoutes, backend: str) -> torch.Tensor:
        length, k = x.shape[1], self.d_conv
        ys = []
        for r in range(self.pattern.num_routes):
            conv, x_proj, dt_proj, a_log, d = self.route_params(r)
            idx = routes.index[r]
            xr, zr = x[:, idx].transpose(1, 2), z[:, idx].transpose(1, 2)  # route order, (batch, E, L)
            xr = F.silu(F.conv1d(xr, conv.weight, conv.bias, padding=k - 1, groups=self.d_inner)[..., :length])
            dt, b, c = torch.split(x_proj(xr.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
            delta = F.linear(dt, dt_proj.weight).transpose(1, 2)
            y = scan.single_scan(
                xr,
                delta,
                -torch.exp(a_log.float()),
                b.transpose(1, 2),
                c.transpose(1, 2),
                d.float(),
                zr,
                dt_proj.bias.float(),
                backend=backend,
            )
            ys.append(y.transpose(1, 2)[:, routes.inverse[r]])  # back to token order
        return torch.stack(ys).mean(0)

    def extra_repr(self) -> str:
        return (
            f"pattern={self.pattern.name}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"dt_rank={self.dt_rank}, scan_backend={self.scan_backend}, path={self.path}"
        )
