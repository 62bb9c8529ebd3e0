"""ResumableWandbLogger: a WandbLogger whose run id is kept in the run folder, so a resumed run continues it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning_utilities.core.rank_zero import rank_zero_only

ID_FILE = "wandb_run_id.txt"


def run_id_for(save_dir: str | Path) -> str:
    """The W&B run id of the run folder ``save_dir``: read from ``wandb_run_id.txt``, or made and written there.

    Only rank 0 writes the file (the other ranks never create a W&B run).
    """
    path = Path(save_dir) / ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 characters of [a-z0-9] too
    if getattr(rank_zero_only, "rank", 0) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


class ResumableWandbLogger(WandbLogger):
    """``WandbLogger(id=<the run folder's id>, resume="allow")``; everything else as Lightning's.

    Offline (``WANDB_MODE=offline``) the run is written under ``<save_dir>/wandb/offline-run-*`` and can be
    uploaded later with ``wandb sync <that folder>``. ``log_model`` uploads checkpoints as artifacts (online).
    """

    def __init__(self, save_dir: str = ".", id: str | None = None, resume: str = "allow", **kwargs: Any) -> None:
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(save_dir=save_dir, id=id or run_id_for(save_dir), resume=resume, **kwargs)
