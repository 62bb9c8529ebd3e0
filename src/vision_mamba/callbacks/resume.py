"""ExactResume: makes `ckpt_path=last` continue exactly -- RNG states and the training loader's position."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning import Callback


def get_rng_states() -> dict[str, Any]:
    """The global generators a training step or a main-process transform may draw from, as tensors and Python
    scalars (a checkpoint must load with ``weights_only=True``, which refuses numpy arrays)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ExactResume(Callback):
    """What Lightning 2.6 leaves out of a mid-epoch resume.

    1. RNG states: checkpoints hold weights, optimiser, schedulers and loop counters, not the generators, so a
       resumed run would draw other augmentations/dropout. They are restored while the checkpoint loads, before
       the first batch is read (exact with ``num_workers=0``; worker processes seed themselves per epoch, so
       with workers the augmentations are reproduced only approximately). Checkpoints hold rank 0's states.
    2. Loader position: Lightning saves the state of a stateful training loader (data/resumable.py) but only
       hands it back when the loader is built after the restore; ``estimated_stepping_batches`` (our
       optimiser's schedule length) builds it before, so the position would be dropped and the resumed epoch
       would start again from its first batch. Here the saved position is given to the loader at train start,
       when the epoch it belongs to is the one being resumed.
    """

    def __init__(self) -> None:
        self._loader_states: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rng": get_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rng"):
            set_rng_states(state_dict["rng"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = list(fit_state.get("combined_loader", []))

    def on_train_start(self, trainer, pl_module) -> None:
        states, self._loader_states = self._loader_states, []
        if not states or trainer.train_dataloader is None:
            return
        loaders = trainer.fit_loop._combined_loader.flattened if trainer.fit_loop._combined_loader else []
        stateful = [dl for dl in loaders if callable(getattr(dl, "load_state_dict", None))]
        for loader, state in zip(stateful, states):
            mid_epoch = state.get("epoch") == trainer.current_epoch and 0 < state.get("consumed", 0) < trainer.num_training_batches
            if mid_epoch and not state.get("exhausted"):
                loader.load_state_dict(state)
