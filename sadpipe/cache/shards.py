"""Reading one image of a sharded per-view array in as few store requests as the layout allows.

The per-view arrays (``views/{v}/targets``, ``detections``, ``box_regression``) have an inner
chunk of one image and a zarr shard of S images, and each shard object ends with an index of
(offset, length) per inner chunk (docs/cache_format.md). zarr 3.1.6 reads that index again on
every partial read, so ``arr[i:i + 1]`` costs two requests (index + chunk) per image and array,
each a full round trip on an object store. :class:`ShardedArrayReader` instead

- keeps every shard index it has read (16 bytes per image; one suffix-range request per shard
  per process), then reads an image's inner chunk with one range request, or
- with a shard order (a student sampling shard by shard, sadpipe/shard_sampler.py), fetches
  whole shards (one request per shard) and reads ahead the shards that come next in the
  background, serving the images of a shard from memory.

Either way the bytes are decoded with the array's own zarr codecs (``zstd`` then the crc32c
check): a corrupt chunk or shard index raises as it does through zarr. This relies on zarr
3.1's sharding codec (``ShardingCodec._decode_shard_index``, ``_shard_index_size`` and its
``codec_pipeline``); ``tests/cache/test_remote.py`` compares every record with zarr's own read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from sadpipe.cache.format import CacheStoreError

_EMPTY = np.uint64(2**64 - 1)  # zarr's marker of an inner chunk that is not stored (all fill)


class ShardedArrayReader:
    """Per-process reader of one sharded array [N, ...] with inner chunks of one image.

    ``read(i)`` -> numpy array of one image's inner chunk, shape [1, ...] (object dtype for
    variable-length bytes). Thread-safe; not picklable (made lazily in each process).
    """

    def __init__(self, store, name: str, max_shards: int = 0):
        arr = zarr.open_array(store, path=name, mode="r", zarr_format=3)  # no probing for zarr v2 keys
        meta = arr._async_array.metadata
        codec = meta.codecs[0] if len(meta.codecs) == 1 else None
        if not isinstance(codec, ShardingCodec) or codec.chunk_shape[0] != 1 \
                or tuple(codec.chunk_shape[1:]) != tuple(arr.shape[1:]):
            raise CacheStoreError(f"{name}: expected a sharded array with one image per inner chunk, "
                                  f"found codecs {meta.codecs}")
        self.store, self.name, self.shape = store, name, tuple(arr.shape)
        self.codec = codec
        self.images_per_shard = int(meta.chunk_grid.chunk_shape[0])
        proto = default_buffer_prototype()
        shard_spec = meta.get_chunk_spec((0,) * len(arr.shape), arr._async_array.config, proto)
        self._chunk_spec = codec._get_chunk_spec(shard_spec)
        self._chunks_per_shard = codec._get_chunks_per_shard(shard_spec)
        self._index_size = codec._shard_index_size(self._chunks_per_shard)
        self._key_of = meta.encode_chunk_key
        self._fill = np.full((1,) + self.shape[1:], meta.fill_value if arr.dtype != object else b"", dtype=arr.dtype)
        self._indexes: dict[int, np.ndarray | None] = {}  # shard -> uint64 [S, 2] (offset, length); None: no object
        self._shards: OrderedDict[int, bytes | None] = OrderedDict()  # whole shards, least recently used first
        self.max_shards = max_shards
        self._lock = threading.Lock()

    def shard_key(self, k: int) -> str:
        return f"{self.name}/{self._key_of((k,) + (0,) * (len(self.shape) - 1))}"

    # ---- bytes from the store ------------------------------------------------------------------

    async def _decode_index(self, raw) -> np.ndarray:
        index = await self.codec._decode_shard_index(raw, self._chunks_per_shard)  # checks the index's crc32c
        return index.offsets_and_lengths.reshape(-1, 2)

    async def _read_index(self, k: int) -> np.ndarray | None:
        request = (RangeByteRequest(0, self._index_size) if self.codec.index_location == ShardingCodecIndexLocation.start
                   else SuffixByteRequest(self._index_size))
        raw = await self.store.get(self.shard_key(k), default_buffer_prototype(), request)
        return None if raw is None or len(raw) == 0 else await self._decode_index(raw)

    async def _fetch_shard(self, k: int) -> tuple[bytes | None, np.ndarray | None]:
        buf = await self.store.get(self.shard_key(k), default_buffer_prototype())
        if buf is None:
            return None, None
        data = buf.to_bytes()
        tail = (data[: self._index_size] if self.codec.index_location == ShardingCodecIndexLocation.start
                else data[-self._index_size:])
        return data, await self._decode_index(default_buffer_prototype().buffer.from_bytes(tail))

    async def _decode_chunk(self, raw: bytes) -> np.ndarray:
        out = await self.codec.codec_pipeline.decode([(default_buffer_prototype().buffer.from_bytes(raw),
                                                       self._chunk_spec)])
        chunk = out[0].as_numpy_array()
        return chunk if chunk.flags.writeable else chunk.copy()  # torch.from_numpy wants writable arrays

    # ---- public --------------------------------------------------------------------------------

    def fetch_shard(self, k: int) -> None:
        """Read shard k whole (one request) into the shard cache, evicting the least recently used."""
        with self._lock:
            if k in self._shards:
                return
        data, index = sync(self._fetch_shard(k))
        with self._lock:
            self._indexes[k] = index
            self._shards[k] = data
            while self.max_shards and len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)

    def has_shard(self, k: int) -> bool:
        with self._lock:
            return k in self._shards

    def read(self, i: int) -> np.ndarray:
        """Image i's inner chunk: from a cached whole shard, else one range request (after at most
        one index request for its shard in this process)."""
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"{self.name}: image {i} out of range [0, {self.shape[0]})")
        k, j = divmod(i, self.images_per_shard)
        with self._lock:
            shard = self._shards.get(k, False)
            if shard is not False:
                self._shards.move_to_end(k)
            index = self._indexes.get(k, False)

        async def go():
            idx = index
            if idx is False:
                idx = await self._read_index(k)
                with self._lock:
                    self._indexes[k] = idx
            if idx is None or idx[j, 0] == _EMPTY:
                return self._fill.copy()
            start, length = int(idx[j, 0]), int(idx[j, 1])
            if shard is not False and shard is not None:
                raw = shard[start:start + length]
            else:
                buf = await self.store.get(self.shard_key(k), default_buffer_prototype(),
                                           RangeByteRequest(start, start + length))
                raw = b"" if buf is None else buf.to_bytes()
            if len(raw) != length:
                raise CacheStoreError(f"{self.shard_key(k)}: inner chunk of image {i} is truncated "
                                      f"({len(raw)} of {length} bytes); run `sadpipe cache verify`")
            return await self._decode_chunk(raw)

        try:
            return sync(go())
        except CacheStoreError:
            raise
        except (ValueError, RuntimeError) as e:  # checksum mismatch, zstd error
            raise CacheStoreError(f"{self.shard_key(k)}: image {i} cannot be decoded ({type(e).__name__}: {e}); "
                                  "the store is corrupt, run `sadpipe cache verify` on it") from e


class ShardReadAhead:
    """Whole-shard reads in a known shard order, the next ones fetched in the background.

    ``order``: the shard numbers in the order a sampler visits them; ``window``: how many
    consecutive shards of that order the sampler mixes at once. Touching a shard of window w
    makes sure every shard of windows w and w + 1 is cached or being fetched (by ``threads``
    background threads), so a reader waits only at the very start. Each array keeps at most
    ``2 * window + 1`` whole shards in memory.
    """

    def __init__(self, order, window: int, threads: int = 2):
        if window < 1:
            raise ValueError(f"the shard window must be >= 1, got {window}")
        self.order = [int(k) for k in order]
        self.window = int(window)
        self._position = {k: p for p, k in enumerate(self.order)}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sadpipe-readahead")
        self._pending: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()

    @property
    def max_shards(self) -> int:
        return 2 * self.window + 1

    def _fetch(self, reader: ShardedArrayReader, k: int) -> Future:
        with self._lock:
            key = (reader.name, k)
            fut = self._pending.get(key)
            if fut is None or (fut.done() and not reader.has_shard(k)):
                fut = self._pool.submit(reader.fetch_shard, k)
                self._pending[key] = fut
            return fut

    def read(self, reader: ShardedArrayReader, i: int) -> np.ndarray:
        k = i // reader.images_per_shard
        p = self._position.get(k)
        if p is None:  # a shard outside the order: plain range read
            return reader.read(i)
        w0 = (p // self.window) * self.window
        wanted = self.order[w0: w0 + 2 * self.window]
        fut = self._fetch(reader, k)
        for other in wanted:
            if other != k and not reader.has_shard(other):
                self._fetch(reader, other)
        fut.result()  # raises the fetch's error, if any
        with self._lock:  # forget finished fetches of shards that left the window
            for key in [key for key, f in self._pending.items() if f.done() and key[1] not in wanted]:
                del self._pending[key]
        return reader.read(i)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
