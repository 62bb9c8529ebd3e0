"""Optimiser parameter groups (no weight decay on norms/biases/SSM params, layer-wise lr decay) and LR schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

SCHEDULE_KINDS = ("cosine", "poly", "step", "constant")


def no_weight_decay_names(net: nn.Module) -> set[str]:
    """Full names of parameters that must not be decayed: what the model declares, plus anything 1-D."""
    names: set[str] = set()
    declared = net.no_weight_decay() if hasattr(net, "no_weight_decay") else set()
    for name, param in net.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name in declared or leaf in declared or param.ndim <= 1 or getattr(param, "_no_weight_decay", False):
            names.add(name)
    # A model may hold its backbone under an attribute (a segmentor, a detector): ask it too
    for prefix, child in net.named_children():
        if hasattr(child, "no_weight_decay"):
            names |= {f"{prefix}.{n}" for n in no_weight_decay_names(child)}
    return names


def build_param_groups(net: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Parameter groups for AdamW: decay/no-decay split, and per-layer lr scales when ``layer_decay`` is set.

    Layer-wise decay needs the model's timm ``group_matcher`` (our backbone has one); each group then carries an
    ``lr_scale`` that the schedule multiplies in.
    """
    skip = no_weight_decay_names(net)
    if layer_decay is not None and layer_decay < 1.0:
        if not hasattr(net, "group_matcher"):
            raise ValueError(f"layer_decay={layer_decay} needs a model with group_matcher(); {type(net).__name__} has none")
        return param_groups_layer_decay(net, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return param_groups_weight_decay(net, weight_decay=weight_decay, no_weight_decay_list=skip)


def warmup_schedule(
    total_steps: int, warmup_steps: int, kind: str = "cosine", warmup_factor: float = 1e-3, min_factor: float = 0.0,
    power: float = 1.0, milestones: tuple[float, ...] = (), gamma: float = 0.1,
) -> Callable[[int], float]:
    """A per-step LR multiplier: linear warm-up from ``warmup_factor``, then ``cosine``, ``poly`` or ``step`` decay,
    or none (``constant``).

    ``milestones`` (for ``step``) are fractions of ``total_steps``.
    """
    if kind not in SCHEDULE_KINDS:  # checked now, not when the warm-up ends hours into the run
        raise ValueError(f"unknown schedule kind {kind!r}: use {', '.join(SCHEDULE_KINDS[:-1])} or {SCHEDULE_KINDS[-1]}")
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "poly":
            return min_factor + (1.0 - min_factor) * (1.0 - progress) ** power
        if kind == "step":
            return gamma ** sum(step >= m * total_steps for m in milestones)
        return 1.0  # constant

    return factor
