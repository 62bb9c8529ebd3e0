"""DatasetError: a dataset on disk is missing, not in the layout a loader expects, or holds a file it cannot use."""

from __future__ import annotations

from pathlib import Path

SKIP_HINT = "or pass data.bad_images=skip to skip such files (python src/check_data.py lists them all)"


class DatasetError(Exception):
    """A problem with the user's data; the entry points print the message without a traceback.

    Raised inside a DataLoader worker, it comes back to the main process re-built from a message that holds the
    worker's whole traceback ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): only the
    last line, our own message, is kept, so the entry points still print one short line.
    """

    user_error = True

    def __init__(self, message: str = "") -> None:
        if "Original Traceback" in message:
            message = message.strip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


class BadImageError(DatasetError):
    """One image or mask file that cannot be used: unreadable, truncated, empty, or not matching its annotation.

    ``data.bad_images=skip`` skips the sample instead (see :class:`vision_mamba.data.bad_files.BadFiles`); the
    message names the file, what is wrong, how to fix it, and that option. Build it with :meth:`of` (the plain
    one-argument constructor is what a DataLoader worker's re-raise calls).
    """

    path: str = ""
    problem: str = ""

    @classmethod
    def of(cls, path: str | Path, problem: str, fix: str = "replace or delete it") -> BadImageError:
        err = cls(f"{path} {problem}: {fix}, {SKIP_HINT}")
        err.path, err.problem = str(path), problem
        return err
