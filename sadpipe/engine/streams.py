"""The batches a run trains on: a seeded, resumable sampler split across ranks, and endless
streams of batches (one per dataset; a run may take turns on several, as SAD does).

Steps per epoch are computed in one place, :func:`steps_per_epoch`, for the plan of a run
and for every stream.
"""

from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from ..errors import TrainingError
from .distributed import DistInfo


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Full batches of one rank in an epoch: each rank takes ``num_images // world_size`` images (drop_last)."""
    per_epoch = (num_images // world_size) // batch_size
    if per_epoch < 1:
        raise TrainingError(f"{num_images} images are fewer than one batch of {batch_size} per rank")
    return per_epoch


def total_steps(streams: list["Stream"], epochs: int, max_steps: int, cli_max_steps: int | None = None) -> int:
    """The run's optimiser steps: ``--max-steps`` (CLI), else ``train.max_steps``, else ``epochs``
    epochs of the first stream, the streams taking turns (so an epoch is ``per_epoch * len(streams)`` steps)."""
    return cli_max_steps or max_steps or epochs * streams[0].per_epoch * len(streams)


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across ranks, that can start mid-epoch.

    Rank r takes every world-th index of the epoch's permutation, truncated so all ranks get
    the same count (drop_last). ``start`` skips the first samples of a resumed epoch.
    """

    def __init__(self, length: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.length, self.seed, self.rank, self.world = length, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.length // self.world - self.start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        per_rank = self.length // self.world
        mine = order[self.rank::self.world][:per_rank]
        return iter(mine[self.start:])


class Stream:
    """An endless, resumable sequence of batches from one dataset (its own epochs and sampler).

    The dataset has ``set_epoch(epoch)`` (flip decisions are per epoch); ``loader_kw`` goes to
    the DataLoader (collate_fn, num_workers, ...).
    """

    def __init__(self, dataset, *, batch_size: int, seed: int, info: DistInfo, loader_kw: dict):
        self.dataset, self.batch_size = dataset, batch_size
        self.sampler = ResumableSampler(len(dataset), seed=seed, rank=info.rank, world_size=info.world_size)
        self.per_epoch = steps_per_epoch(len(dataset), batch_size, info.world_size)
        self.loader_kw = loader_kw

    def batches(self, consumed: int):
        """Yield batches forever, starting after ``consumed`` batches (a resumed run skips what it saw)."""
        while True:
            epoch, offset = divmod(consumed, self.per_epoch)
            self.sampler.set_epoch(epoch, offset * self.batch_size)
            self.dataset.set_epoch(epoch)
            for batch in DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                                    **self.loader_kw):
                consumed += 1
                yield batch
                if consumed % self.per_epoch == 0:
                    break  # the epoch ends here for this rank; the next epoch reshuffles


class ConcatWithEpoch(ConcatDataset):
    """Datasets one after the other (a mixed stream); ``set_epoch`` reaches each of them."""

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)
