"""The training loader's order (DistributedSampler's, per epoch) and its exact mid-epoch resume, in process."""

from __future__ import annotations

import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler

from vision_mamba.callbacks.resume import ExactResume
from vision_mamba.data.resumable import EpochRandomSampler, ResumableDataLoader

N, BATCH = 23, 4  # 6 batches an epoch, the last one short


def distributed_order(seed: int, epoch: int, replicas: int = 1, rank: int = 0) -> list[int]:
    """The order torch's DistributedSampler gives: the one the training loader promises to follow."""
    sampler = DistributedSampler(range(N), num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def batched(order: list[int]) -> list[list[int]]:
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def read(batches) -> list[list[int]]:
    return [b.tolist() for b in batches]


def test_the_shuffled_order_is_distributed_samplers_for_each_epoch() -> None:
    data = list(range(N))
    loader = ResumableDataLoader(data, BATCH, seed=7, shuffle=True)  # batch size passed positionally, as DataLoader
    assert isinstance(loader.sampler, EpochRandomSampler)
    assert read(loader) == batched(distributed_order(7, 0))
    loader.sampler.set_epoch(3)  # what Lightning calls at each epoch start
    assert read(loader) == batched(distributed_order(7, 3))
    assert distributed_order(7, 3) != distributed_order(7, 0)
    # two processes under DDP each take every other index of this order: together the 1-process run's images
    order = list(loader.sampler)
    assert [distributed_order(7, 3, 2, r) for r in (0, 1)] == [order[0::2], order[1::2] + order[:1]]
    # no seed: DistributedSampler's default, 0
    assert read(ResumableDataLoader(data, BATCH, shuffle=True)) == batched(distributed_order(0, 0))
    assert list(EpochRandomSampler(data)) == distributed_order(0, 0)


def test_a_sampler_of_ones_own_is_kept_and_unshuffled_loaders_stay_in_order() -> None:
    data = list(range(N))
    assert read(ResumableDataLoader(data, batch_size=BATCH)) == batched(list(range(N)))
    assert read(ResumableDataLoader(data, batch_size=BATCH, shuffle=False)) == batched(list(range(N)))
    mine = list(reversed(range(N)))
    assert read(ResumableDataLoader(data, batch_size=BATCH, sampler=mine)) == batched(mine)
    # shuffle with a sampler is DataLoader's own error: the sampler is not swapped for ours behind the user's back
    with pytest.raises(ValueError, match="sampler option is mutually exclusive with shuffle"):
        ResumableDataLoader(data, batch_size=BATCH, shuffle=True, sampler=mine)
    with pytest.raises(ValueError, match="batch_sampler option is mutually exclusive"):
        ResumableDataLoader(data, shuffle=True, batch_sampler=BatchSampler(mine, BATCH, False))


def test_resume_mid_epoch_hands_out_exactly_the_rest_of_the_epoch() -> None:
    data = list(range(N))
    full = batched(distributed_order(5, 2))
    first = ResumableDataLoader(data, batch_size=BATCH, seed=5, shuffle=True)
    assert first.state_dict() == {"epoch": 0, "consumed": 0, "exhausted": False}
    first.sampler.set_epoch(2)
    it = iter(first)
    taken = read(next(it) for _ in range(3))
    assert taken == full[:3]
    state = first.state_dict()
    assert state == {"epoch": 2, "consumed": 3, "exhausted": False}

    # a new loader, at epoch 0 as after a restart, given the saved position
    resumed = ResumableDataLoader(data, batch_size=BATCH, seed=5, shuffle=True)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full)  # the length stays the whole epoch's: Lightning counts the batches from it
    it = iter(resumed)
    assert read([next(it), next(it)]) == full[3:5]
    assert resumed.state_dict() == {"epoch": 2, "consumed": 5, "exhausted": False}
    assert read(it) == full[5:]
    assert resumed.state_dict() == {"epoch": 2, "consumed": len(full), "exhausted": True}

    # the position arriving after the iterator was made (Lightning makes it early), before its first batch
    early = ResumableDataLoader(data, batch_size=BATCH, seed=5, shuffle=True)
    it = iter(early)
    early.load_state_dict(state)
    assert read(it) == full[3:]

    # a saved position at the end of an epoch: the next epoch starts from its first batch
    ended = ResumableDataLoader(data, batch_size=BATCH, seed=5, shuffle=True)
    ended.load_state_dict({"epoch": 2, "consumed": len(full), "exhausted": True})
    ended.sampler.set_epoch(3)
    it = iter(ended)
    assert read([next(it)]) == batched(distributed_order(5, 3))[:1]
    assert ended.state_dict() == {"epoch": 3, "consumed": 1, "exhausted": False}
    # and a plain restart of the iteration counts from 0 again
    assert read(ended) == batched(distributed_order(5, 3))
    it = iter(ended)
    next(it)
    assert ended.state_dict() == {"epoch": 3, "consumed": 1, "exhausted": False}


def test_resume_with_a_batch_sampler_or_no_epoch_at_all() -> None:
    data = list(range(N))

    def loader() -> ResumableDataLoader:
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
        return ResumableDataLoader(data, batch_sampler=BatchSampler(sampler, BATCH, drop_last=True))

    full = batched(distributed_order(3, 4))[:-1]  # drop_last
    first = loader()
    first.batch_sampler.sampler.set_epoch(4)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state == {"epoch": 4, "consumed": 2, "exhausted": False}  # the epoch read from the batch sampler's sampler
    resumed = loader()
    resumed.load_state_dict(state)
    assert read(resumed) == full[2:]

    # an unshuffled loader has no epoch (0) and resumes in order; a batch sampler without a .sampler, likewise
    plain = ResumableDataLoader(data, batch_size=BATCH)
    plain.load_state_dict({"epoch": 0, "consumed": 4, "exhausted": False})
    assert isinstance(plain.sampler, SequentialSampler)
    assert read(plain) == batched(list(range(N)))[4:]
    assert plain.state_dict() == {"epoch": 0, "consumed": 6, "exhausted": True}
    lists = ResumableDataLoader(data, batch_sampler=[[0, 1], [2, 3], [4]])
    lists.load_state_dict({"epoch": 0, "consumed": 1, "exhausted": False})
    assert read(lists) == [[2, 3], [4]]
    assert lists.state_dict() == {"epoch": 0, "consumed": 3, "exhausted": True}


class _Recorder(LightningModule):
    """Trains on nothing: records the index batches Lightning hands its training step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(list(range(N)), batch_size=BATCH, seed=5, shuffle=True, drop_last=True)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.tolist())
        return (self.weight * batch.float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_lightning_run_stopped_mid_epoch_resumes_with_the_rest_of_that_epoch(tmp_path) -> None:
    def trainer(**kw) -> Trainer:
        return Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path, **kw)

    epochs = [batched(distributed_order(5, e))[:-1] for e in (0, 1)]  # 5 whole batches an epoch
    whole = _Recorder()  # saves a checkpoint after 7 steps: 2 batches into the second epoch
    trainer(callbacks=[ExactResume(), ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=7, save_top_k=-1)]).fit(whole)
    assert whole.seen == epochs[0] + epochs[1]
    resumed = _Recorder()
    trainer(callbacks=[ExactResume()], enable_checkpointing=False).fit(resumed, ckpt_path=tmp_path / "step=7.ckpt")
    assert resumed.seen == epochs[1][2:]
