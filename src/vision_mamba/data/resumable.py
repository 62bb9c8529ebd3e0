"""ResumableDataLoader: a training loader that reshuffles per epoch from a seed and resumes mid-epoch exactly."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler


class EpochRandomSampler(RandomSampler):
    """A RandomSampler whose order is ``randperm(n, seed + epoch)``: the order DistributedSampler uses.

    Being a RandomSampler, Lightning swaps it for a DistributedSampler under DDP, and the global batches of a
    2-process run are then the same images as the 1-process run's (each rank takes every other index).
    """

    def __init__(self, data_source, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader with Lightning's ``state_dict``/``load_state_dict`` interface, for exact mid-epoch resume.

    Lightning 2.6 restores its loop counters but does not fast-forward a plain DataLoader: the resumed epoch
    would start again from its first batch, in a new order. This loader records the epoch and how many batches
    it handed out; after a restore it skips that many *index* batches (no image is read) in the same per-epoch
    order. Lightning does not prefetch from sized loaders (this one always is), so batches handed out = batches
    trained on. callbacks/resume.py (ExactResume) hands the saved position back and restores the RNG states.
    """

    def __init__(self, dataset, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        # with a batch_sampler too, DataLoader refuses the sampler just as it would have refused shuffle
        if kwargs.get("shuffle") and kwargs.get("sampler") is None:
            kwargs["shuffle"] = None
            kwargs["sampler"] = EpochRandomSampler(dataset, seed=seed)
        super().__init__(dataset, *args, **kwargs)
        self._fetched = 0  # batches handed out by the current iterator
        self._exhausted = False
        self._pending: dict[str, Any] | None = None  # a restored position, applied by the next __iter__

    def _set_epoch(self, epoch: int) -> None:
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if s is not None and callable(getattr(s, "set_epoch", None)):
                s.set_epoch(epoch)

    def _current_epoch(self) -> int:
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(s, "epoch"):
                return int(s.epoch)
        return 0

    @property
    def _index_sampler(self):
        # DataLoader's iterators read their indices from here, so skipping here costs no image reads
        index_sampler = super()._index_sampler
        skip = self._pending["consumed"] if self._pending else 0
        return _Skip(index_sampler, skip) if skip else index_sampler

    def __iter__(self):
        pending = self._pending
        if pending is not None:
            # Lightning creates the iterator before it sets the sampler epoch of a resumed epoch: set it here
            self._set_epoch(pending["epoch"])
        iterator = super().__iter__()
        self._pending = None
        self._fetched = pending["consumed"] if pending else 0
        self._exhausted = False
        return self._track(iterator)

    def _track(self, iterator):
        if self._pending is not None:
            # the position arrived after the iterator was made (Lightning makes it early, when the optimiser
            # asks for the number of steps) but before its first batch: make it again from that position
            iterator = self.__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self._exhausted = True
                return
            self._fetched += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._current_epoch(), "consumed": self._fetched, "exhausted": self._exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("exhausted"):
            return  # the epoch had ended: the next one starts from its first batch
        self._pending = dict(state)


class _Skip:
    """An index (batch) sampler without its first ``n`` items; the length stays the full epoch's."""

    def __init__(self, sampler, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return len(self.sampler)
