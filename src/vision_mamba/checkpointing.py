"""Checkpoint files of a run: written atomically as plain data, read only with weights_only.

- ``load_checkpoint(path)``: the one loader every entry point uses (torch.load with ``weights_only=True`` and a short
  allow-list; any other file is refused with one line naming what is wrong), ``check_checkpoint_file(path)`` the same
  checks without loading the tensors. Both live in models/checkpoints.py so that plain models load weights without
  Lightning; they are imported from here.
- ``SafeCheckpointIO``: the Lightning checkpoint-IO plugin of every trainer. It writes a checkpoint as plain data
  (no OmegaConf or numpy objects) to a temporary file and renames it, so a kill never leaves half a file and every
  checkpoint loads with ``weights_only=True``; it reads through ``load_checkpoint``.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from vision_mamba.models.checkpoints import SAFE_GLOBALS, CheckpointError, check_checkpoint_file, load_checkpoint

__all__ = [
    "CheckpointError",
    "SAFE_GLOBALS",
    "SafeCheckpointIO",
    "check_checkpoint_file",
    "load_checkpoint",
    "to_plain",
]


# --- writing -----------------------------------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """``obj`` with OmegaConf containers, other mappings and numpy values turned into dicts, lists, tensors and
    Python scalars: what ``torch.load(weights_only=True)`` accepts. Tensors and OrderedDicts (state dicts) stay."""
    if isinstance(obj, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(obj, resolve=True)
        except Exception:  # an interpolation that only resolves inside the whole config: keep its text
            return OmegaConf.to_container(obj, resolve=False)
    if type(obj) is OrderedDict:
        return OrderedDict((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, Mapping):  # dict, and subclasses such as Lightning's AttributeDict of hyper-parameters
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):  # a namedtuple becomes a plain tuple
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic, plain-data writes and weights_only reads.

    Save: ``to_plain(checkpoint)`` goes to ``<dir>/.<name>.tmp-*``, is fsynced, checked to load with
    ``weights_only=True`` (its pickle record names no other type), then ``os.replace``-d onto the final name:
    readers see the old complete file or the new complete one (``os.replace`` is atomic on POSIX file systems).
    Load: ``load_checkpoint`` whatever ``weights_only`` Lightning asks for. Remote paths use Lightning's own IO
    (with ``weights_only=True``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        checkpoint = to_plain(checkpoint)
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a checkpoint gets the umask's permissions
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                refused = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
            if refused:
                raise TypeError(f"a checkpoint must hold plain data to load with weights_only=True; {path.name} "
                                f"would hold {sorted(refused)} (convert them in the state_dict that adds them)")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        return load_checkpoint(path, map_location=map_location or "cpu")


def _umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _is_local(path) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
