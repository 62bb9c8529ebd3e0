"""create_model: the Hydra target for `model=` configs -- timm.create_model with weights from a local file."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn


def create_model(model_name: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered Vim variant; ``pretrained`` is a local checkpoint path (nothing is downloaded)."""
    import vision_mamba.models.vim  # noqa: F401  (registers the Vim variants with timm)

    if model_name not in timm.list_models("vim_*"):
        from vision_mamba.models.checkpoints import CheckpointError

        options = ", ".join(timm.list_models("vim_*"))
        raise CheckpointError(f"unknown model_name={model_name!r}; registered Vim models: {options}")
    return timm.create_model(model_name, pretrained_path=pretrained, **kwargs)
