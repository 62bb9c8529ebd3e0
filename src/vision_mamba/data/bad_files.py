"""``data.bad_images``: what a dataset does with a file it cannot use.

``error`` (the default) stops at the first one with a single line naming the file and this option. ``skip`` loads the
next sample in its place (index + 1, + 2, ...: the same replacement every time), and records the file; the main
process lists what was skipped once per epoch in the log and in ``<run>/bad_images.txt``. The record is a file that
every process appends to, so files met inside DataLoader workers are listed too.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from vision_mamba.data.errors import BadImageError, DatasetError

log = logging.getLogger(__name__)

MODES = ("error", "skip")
# a run of this many unusable samples in a row means a broken dataset (or a wrong setting), not a few bad files
MAX_IN_A_ROW = 100
REPORT_NAME = "bad_images.txt"
SHOWN_IN_LOG = 10


class BadFiles:
    """A dataset's bad-file policy (``mode`` is ``data.bad_images``) and, with ``skip``, its record of skipped files.

    Datasets read a sample through :meth:`load`. The record is a temporary file made here, in the main process,
    before any loader worker starts; workers inherit its path and append one line per skip (``path<TAB>problem``).
    """

    def __init__(self, mode: str = "error") -> None:
        if mode not in MODES:
            raise DatasetError(
                f"data.bad_images={mode} is not an option: use error (stop at the first unusable file) or skip "
                "(skip it, and list it in the log and in <run>/bad_images.txt)"
            )
        self.mode = mode
        self.record_path: str | None = None
        self._read_upto = 0
        if mode == "skip":
            fd, self.record_path = tempfile.mkstemp(prefix="vim-bad-images-", suffix=".tsv")
            os.close(fd)
            weakref.finalize(self, _remove, self.record_path, os.getpid())

    def load(self, index: int, length: int, load: Callable[[int], Any]) -> Any:
        """``load(index)``, or with ``skip``, that of the next index whose files can be used."""
        if self.mode == "error":
            return load(index)
        first = None
        for step in range(min(length, MAX_IN_A_ROW)):
            try:
                return load((index + step) % length)
            except BadImageError as err:
                self.record(err)
                first = first or err
        raise DatasetError(
            f"{min(length, MAX_IN_A_ROW)} samples in a row from index {index} cannot be used (the first: {first.path} "
            f"{first.problem}): the dataset looks broken or misconfigured; run python src/check_data.py on it"
        )

    def record(self, err: BadImageError) -> None:
        # one short line per append (O_APPEND): lines stay whole, whichever process writes them
        with open(self.record_path, "ab") as f:
            f.write(f"{err.path}\t{err.problem}\n".encode())

    def read_new(self) -> list[tuple[str, str]]:
        """(path, problem) of the skips recorded since the last call, in the order they happened."""
        with open(self.record_path, "rb") as f:
            f.seek(self._read_upto)
            lines = f.readlines()
        complete = [line for line in lines if line.endswith(b"\n")]  # a line still being written waits
        self._read_upto += sum(map(len, complete))
        return [tuple(line.decode().rstrip("\n").split("\t", 1)) for line in complete]

    def attach(self, trainer: Trainer | None) -> None:
        """Have ``trainer`` report this record at every epoch end (once per trainer; nothing to do for ``error``)."""
        if self.mode != "skip" or trainer is None:
            return
        if not any(isinstance(c, BadFileReport) and c.bad_files is self for c in trainer.callbacks):
            trainer.callbacks.append(BadFileReport(self))


def _remove(path: str, owner: int) -> None:
    if os.getpid() != owner:  # a forked loader worker inherits the finalizer: only the main process removes the record
        return
    try:
        os.remove(path)
    except OSError:
        pass


class BadFileReport(Callback):
    """Lists the files skipped under ``data.bad_images=skip``: one log line for each epoch in which some were met
    (written when its validation ends; files met after that, when its training ends) and one after a test, and
    ``<run>/bad_images.txt`` (every file skipped so far, ``path<TAB>problem``, sorted; ``bad_images.rank<N>.txt`` for
    the other processes of a multi-process run, which read other files). Added by the datamodule's ``setup``."""

    def __init__(self, bad_files: BadFiles) -> None:
        self.bad_files = bad_files
        self.skipped: dict[str, str] = {}

    def report(self, trainer: Trainer, when: str) -> None:
        new = self.bad_files.read_new()
        if not new:
            return
        met = dict(new)
        self.skipped.update(met)
        rank = trainer.global_rank
        path = Path(trainer.default_root_dir) / (REPORT_NAME if rank == 0 else f"bad_images.rank{rank}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{p}\t{why}\n" for p, why in sorted(self.skipped.items())))
        tmp.replace(path)
        shown = "; ".join(f"{p} ({why})" for p, why in list(met.items())[:SHOWN_IN_LOG])
        more = f"; and {len(met) - SHOWN_IN_LOG} more" if len(met) > SHOWN_IN_LOG else ""
        log.warning(
            f"data.bad_images=skip: {when} skipped {len(met)} unusable file(s) "
            f"({len(new)} time(s)), {len(self.skipped)} in this run so far, listed in {path}: {shown}{more}"
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.report(trainer, f"epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:  # what the sanity check met is reported with the first epoch
            self.report(trainer, f"epoch {trainer.current_epoch}")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.report(trainer, "the test")
