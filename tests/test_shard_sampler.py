"""ShardAwareSampler: every image once per epoch, at most W shards open at a time, resumable,
ranks take disjoint shards, and the reader is told each epoch's shard order."""

from __future__ import annotations

import pytest

from sadpipe.shard_sampler import ShardAwareSampler

# 7 shards of 4 images (the last one short: 2), shuffled over the dataset, plus 5 images the cache lacks
SHARD_OF = [k for k in range(7) for _ in range(4 if k < 6 else 2)]
SHARD_OF = [SHARD_OF[(i * 11) % len(SHARD_OF)] for i in range(len(SHARD_OF))] + [-1] * 5


def _max_open_shards(order, shard_of) -> int:
    """Most shards started but not finished at any point of ``order`` (an independent count)."""
    remaining = {}
    for i in order:
        remaining[shard_of[i]] = remaining.get(shard_of[i], 0) + 1
    left, open_, most = dict(remaining), set(), 0
    for i in order:
        k = shard_of[i]
        open_.add(k)
        left[k] -= 1
        most = max(most, len(open_))
        if left[k] == 0:
            open_.discard(k)
    return most


@pytest.mark.parametrize("window", [1, 2, 3])
def test_each_image_once_and_at_most_window_shards_open(window):
    s = ShardAwareSampler(SHARD_OF, window=window, seed=3)
    s.set_epoch(0)
    order = list(s)
    assert sorted(order) == list(range(len(SHARD_OF))) and len(s) == len(SHARD_OF)
    # the 5 uncached images (26..30) form groups of the mean shard size, round(26 / 7) = 4: {26..29}, {30};
    # each group counts as a shard
    keyed = SHARD_OF[:26] + ["loose0"] * 4 + ["loose1"]
    assert _max_open_shards(order, keyed) <= window
    if window == 1:  # shard by shard: each shard's images are consecutive
        assert _max_open_shards(order, keyed) == 1


def test_orders_are_seeded_per_epoch_and_resumable():
    a, b = ShardAwareSampler(SHARD_OF, window=2, seed=0), ShardAwareSampler(SHARD_OF, window=2, seed=0)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(2)
    assert list(a) != first
    b.set_epoch(1, start=9)
    assert list(b) == first[9:] and len(b) == len(SHARD_OF) - 9
    assert list(ShardAwareSampler(SHARD_OF, window=2, seed=1).__iter__()) != list(
        ShardAwareSampler(SHARD_OF, window=2, seed=0).__iter__())


class _Recorder:
    def __init__(self):
        self.calls = []

    def set_shard_order(self, order, window):
        self.calls.append((list(order), window))


def test_ranks_take_disjoint_shards_and_tell_the_reader_their_order():
    shard_of = [k for k in range(8) for _ in range(4)]  # 8 equal shards: no padding needed
    orders, told = [], []
    for rank in range(2):
        rec = _Recorder()
        s = ShardAwareSampler(shard_of, window=2, seed=5, rank=rank, world_size=2, cache=rec)
        s.set_epoch(0)
        orders.append(list(s))
        told.append(rec.calls)
    assert len(orders[0]) == len(orders[1]) == 16
    assert not set(orders[0]) & set(orders[1]) and set(orders[0]) | set(orders[1]) == set(range(32))
    shards = [{shard_of[i] for i in o} for o in orders]
    assert not shards[0] & shards[1]
    for rank in range(2):
        (order, window), = told[rank]
        assert window == 2 and set(order) == shards[rank]
        # the announced order is the order the rank meets its windows of 2 shards
        met = list(dict.fromkeys(shard_of[i] for i in orders[rank]))
        assert [set(met[j:j + 2]) for j in (0, 2)] == [set(order[j:j + 2]) for j in (0, 2)]


def test_uneven_ranks_are_padded_to_the_same_length():
    shard_of = [0] * 4 + [1] * 4 + [2] * 2  # 10 images, 3 shards: one rank gets 2 shards, the other 1
    orders = []
    for rank in range(2):
        s = ShardAwareSampler(shard_of, window=1, seed=0, rank=rank, world_size=2)
        s.set_epoch(0)
        orders.append(list(s))
    assert [len(o) for o in orders] == [5, 5]  # 10 // 2 each: DDP ranks must take the same number of steps
    shards = [{shard_of[i] for i in o} for o in orders]
    assert sorted(map(len, shards)) == [1, 2] and not shards[0] & shards[1]
