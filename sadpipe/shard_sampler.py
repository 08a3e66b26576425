"""Opt-in shard-local sampling of a student stream, so teacher-cache reads can be whole shards
read ahead in the background (``distill.shard_window``; docs/cache_format.md, "Remote stores").

The default :class:`~sadpipe.engine.streams.ResumableSampler` draws a fresh random permutation of all
images each epoch; on a high-latency store every record then costs one range request per array
and a shard index request the first time each shard is met. :class:`ShardAwareSampler` instead

1. groups the dataset's images by the store shard that holds their teacher record (images the
   cache lacks form groups of the same size in dataset order),
2. shuffles the groups (seeded by seed and epoch), gives every world_size-th group to each rank,
3. walks the rank's groups ``window`` at a time and shuffles the images inside each window.

So a batch mixes images of ``window`` shards (``window x S`` candidates) instead of the whole
dataset, and consecutive batches come from the same few shards; every image is still seen once
per epoch, in an order that changes every epoch. The reader (``TeacherCache.set_shard_order``)
then fetches each shard once per DataLoader worker and reads the next window ahead.
Resumable like ResumableSampler: ``set_epoch(epoch, start)`` skips the first ``start`` samples.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import ConcatDataset, Sampler


class ShardAwareSampler(Sampler[int]):
    """Dataset indices shard by shard (see the module docstring).

    shard_of: the store shard of each dataset index (-1: not in the cache). ``cache``: an
    optional TeacherCache told each epoch's shard order of this rank (read-ahead).
    All ranks yield ``len(shard_of) // world_size`` indices (a rank whose groups hold fewer
    repeats its first ones, as torch's DistributedSampler pads).
    """

    def __init__(self, shard_of: Sequence[int], *, window: int, seed: int, rank: int = 0, world_size: int = 1,
                 cache=None):
        if window < 1:
            raise ValueError(f"the shard window must be >= 1, got {window}")
        self.length, self.window, self.seed = len(shard_of), int(window), seed
        self.rank, self.world, self.cache = rank, world_size, cache
        self.epoch = 0
        self.start = 0
        by_shard: dict[int, list[int]] = {}
        loose = []
        for i, k in enumerate(shard_of):
            (by_shard.setdefault(int(k), []).append(i) if k >= 0 else loose.append(i))
        size = max(1, round(sum(map(len, by_shard.values())) / len(by_shard))) if by_shard else 16
        self.groups: list[tuple[int, list[int]]] = sorted(by_shard.items())
        self.groups += [(-1, loose[j:j + size]) for j in range(0, len(loose), size)]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        if self.cache is not None:
            shards, _ = self._rank_order()
            self.cache.set_shard_order([k for k in shards if k >= 0], self.window)

    def __len__(self) -> int:
        return self.length // self.world - self.start

    def _rank_order(self) -> tuple[list[int], list[int]]:
        """(this rank's shards in visiting order, this rank's dataset indices for the epoch)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(len(self.groups), generator=g).tolist()
        mine = [self.groups[p] for p in perm[self.rank::self.world]]
        order: list[int] = []
        for w in range(0, len(mine), self.window):
            members = [i for _, idx in mine[w:w + self.window] for i in idx]
            order += [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        per_rank = self.length // self.world
        while order and len(order) < per_rank:
            order += order[: per_rank - len(order)]
        return [k for k, _ in mine], order[:per_rank]

    def __iter__(self):
        _, order = self._rank_order()
        return iter(order[self.start:])


def _teacher_datasets(dataset) -> list:
    return [d for part in (dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset])
            for d in ([part] if hasattr(part, "cache") and hasattr(part, "base") else [])]


def use_shard_order(stream, cache, *, window: int, info) -> None:
    """Replace ``stream``'s sampler by a ShardAwareSampler over ``cache``'s shards and give the
    stream its own clone of the cache (two streams read different shard orders).

    ``stream``: an engine.streams.Stream whose dataset is a tasks.distill.WithTeacher or a ConcatDataset of them.
    """
    parts = _teacher_datasets(stream.dataset)
    if not parts or len(parts) != len(getattr(stream.dataset, "datasets", [stream.dataset])):
        raise TypeError("use_shard_order needs a stream of WithTeacher datasets")
    mine = cache.clone()
    s = cache.metadata["images_per_shard"]
    shard_of = []
    for part in parts:
        shard_of += [cache.index_of(i) // s if i in cache else -1 for i in part.base.image_ids]
        if part.cache is cache:
            part.cache = mine
    stream.sampler = ShardAwareSampler(shard_of, window=window, seed=stream.sampler.seed, rank=info.rank,
                                       world_size=info.world_size, cache=mine)
