"""The data check behind ``src/check_data.py``: every file of every split read in parallel, by the functions the
loaders read them with, so what it calls bad is exactly what would stop (or be skipped in) a training run."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vision_mamba.data.errors import DatasetError


@dataclass
class SplitCheck:
    """One split to check: ``read(item)`` for every item (a module-level function, so worker processes can run it)
    raises a DatasetError for an unusable sample or returns statistics, which ``merge(stats)`` takes in (in this
    process). ``summary``: what is known from the listing and the annotations (classes, images, annotations...),
    printed as ``key value`` pairs."""

    name: str
    items: list[Any]
    read: Callable[[Any], Any]
    summary: dict[str, Any] = field(default_factory=dict)
    merge: Callable[[Any], None] | None = None


@dataclass
class BadSample:
    split: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.split}: {self.path} {self.problem}"


def _read_one(read: Callable[[Any], Any], item: Any) -> tuple[tuple[str, str] | None, Any]:
    """``(None, statistics)``, or ``((path, problem), None)`` for an unusable sample."""
    try:
        return None, read(item)
    except DatasetError as err:
        return (getattr(err, "path", "") or str(item), getattr(err, "problem", "") or str(err)), None


def read_all(split: SplitCheck, workers: int, progress: Progress) -> Iterator[BadSample]:
    """Read every item of ``split`` in ``workers`` processes (in this one for 1), merging statistics into its
    summary and yielding the bad samples as they are found."""
    task = progress.add_task(split.name, total=len(split.items))
    reader = partial(_read_one, split.read)
    chunk = max(1, min(256, len(split.items) // (workers * 8) or 1))
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers)
        results = pool.imap_unordered(reader, split.items, chunksize=chunk)
    else:
        pool, results = None, map(reader, split.items)
    try:
        for bad, stats in results:
            progress.advance(task)
            if bad is not None:
                yield BadSample(split.name, *bad)
            elif split.merge is not None:
                split.merge(stats)
    finally:
        if pool is not None:
            pool.terminate()


def check_splits(splits: list[SplitCheck], workers: int | None = None, show_progress: bool = True) -> list[BadSample]:
    """Read every split (with a rich progress bar); return the bad samples, sorted by split and path."""
    workers = workers or os.cpu_count() or 1
    columns = (TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bad: list[BadSample] = []
    with Progress(*columns, disable=not show_progress) as progress:
        for split in splits:
            bad += read_all(split, workers, progress)
    return sorted(bad, key=lambda b: (b.split, b.path))
