"""Pieces every datamodule shares: checks of the loader settings and split sizes, the per-device batch size, the
loader worker rules, and writing an embedded dataset once, atomically."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vision_mamba.data.errors import DatasetError

MARKER = ".complete"


def dataset_root(root: str | Path | None, layout_hint: str) -> Path:
    """``data.root`` as a Path, or a DatasetError saying it must be set and what layout it should hold."""
    if root in (None, "", "???"):
        raise DatasetError(f"data.root is not set: pass data.root=DIR ({layout_hint})")
    return Path(root)


def check_loader_settings(**settings: int | None) -> None:
    """Batch sizes (``batch_size``, ``val_batch_size``, ...) must be positive and ``num_workers`` at least 0: checked
    when the datamodule is built, before anything runs. ``None`` means "not set" and passes."""
    for name, value in settings.items():
        if value is None:
            continue
        if name == "num_workers":
            if value < 0:
                raise DatasetError(f"data.num_workers={value}: the number of loader worker processes must be 0 "
                                   "(load in the main process) or more")
        elif value < 1:
            raise DatasetError(f"data.{name}={value}: a batch size must be a positive number of samples")


def check_enough_for_a_batch(num_samples: int, batch_size: int, what: str) -> None:
    """The training loaders drop an incomplete last batch: a split smaller than the global batch gives no step."""
    if num_samples < batch_size:
        raise DatasetError(
            f"{what} has {num_samples} training samples, fewer than one global batch (data.batch_size={batch_size}): "
            f"no training step could run; set data.batch_size={max(1, num_samples)} or less, or add data"
        )


def per_device_batch_size(batch_size: int, trainer) -> int:
    """``batch_size`` is the global batch size: split it over the trainer's processes, or say why it cannot be."""
    world = trainer.world_size if trainer is not None else 1
    if batch_size % world != 0:
        raise DatasetError(
            f"data.batch_size={batch_size} is the global batch size and must divide by the "
            f"number of processes ({world}); pick a multiple of {world}"
        )
    return batch_size // world


def make_loader(dataset, hparams, batch_size: int, *, shuffle: bool, drop_last: bool, loader_cls=DataLoader, **kw):
    """A loader with the datamodules' worker rules: ``hparams.num_workers`` workers, pinned memory only where CUDA
    is, persistent workers only when there are workers. ``kw`` (sampler, collate_fn, ...) goes to ``loader_cls``."""
    workers = hparams.num_workers
    return loader_cls(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=hparams.pin_memory and torch.cuda.is_available(),
        persistent_workers=hparams.persistent_workers and workers > 0,
        drop_last=drop_last,
        **kw,
    )


def write_dataset_once(root: str | Path, write: Callable[[Path], str]) -> Path:
    """Fill ``root`` with ``write(folder)`` unless a complete copy is already there.

    ``write`` fills a temporary sibling folder and returns a one-line summary; the folder is marked complete and
    renamed onto ``root`` at the end, so an interrupted write never leaves a half-filled dataset behind.
    """
    root = Path(root)
    if (root / MARKER).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # a unique sibling made by mkdir, which honours the umask (mkdtemp would make it 0700 whatever the umask)
    tmp = root.parent / f".{root.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        summary = write(tmp)
        (tmp / MARKER).write_text(summary + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if root.exists():  # a stale, unmarked folder from an interrupted earlier write
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
