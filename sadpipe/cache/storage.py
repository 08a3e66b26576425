"""Where a teacher cache lives: a local directory or an fsspec URL (``s3://``, ``gs://``, ...).

Everything the writer, the reader and ``verify``/``info`` do to a store outside zarr arrays
(does it exist, is it a store, delete it, list sizes, make written data durable) goes
through :class:`StoreLocation`, so the code is the same wherever the store lives and the
layout never depends on it.

- A local path (or a ``file://`` URL) opens zarr's ``LocalStore``: every key is written to a
  temporary file and renamed over the target, so a reader sees the old or the new file.
- Any other URL opens zarr's ``FsspecStore`` (``s3://`` needs s3fs: ``pip install
  'sadpipe[remote]'``). On S3 every key is one PUT of the whole object, which readers see
  entirely or not at all; that replaces the rename (docs/cache_format.md, "Remote stores").

Credentials and endpoints come from the usual places of each filesystem (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``, and
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers, which botocore
reads). ``SADPIPE_STORAGE_OPTIONS`` may hold a JSON object of extra fsspec options
(e.g. ``{"endpoint_url": "http://127.0.0.1:9000", "profile": "minio"}``) for every URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, WrapperStore

from sadpipe.cache.format import CacheStoreError

ENV_STORAGE_OPTIONS = "SADPIPE_STORAGE_OPTIONS"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")


class StorageError(CacheStoreError, ValueError):
    """A store URL cannot be opened (unknown scheme, missing filesystem package, bad options)."""


def is_url(value) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (those are local paths)."""
    if not isinstance(value, str):
        return False
    m = _SCHEME.match(value)
    return bool(m) and m.group(1).lower() != "file"


def env_storage_options() -> dict:
    text = os.environ.get(ENV_STORAGE_OPTIONS, "").strip()
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise StorageError(f"{ENV_STORAGE_OPTIONS} must be a JSON object of fsspec options: {e}") from None
    if not isinstance(opts, dict):
        raise StorageError(f"{ENV_STORAGE_OPTIONS} must be a JSON object, got {type(opts).__name__}")
    return opts


def default_storage_options(url: str) -> dict:
    """fsspec options sadpipe sets unless the user overrides them.

    - ``use_listings_cache=False``: a store is written by one process and read by others; a
      cached listing would hide keys written after it (the completion mark, new shards).
    - s3: ``max_concurrency=1``: s3fs otherwise sends a HEAD before every whole-object GET (to
      split large downloads); shards are a few MB, so that request would be pure latency.
    """
    opts: dict[str, Any] = {"use_listings_cache": False}
    if url.split("://", 1)[0].lower() in ("s3", "s3a"):
        opts["max_concurrency"] = 1
    return opts


# ---- request counting and injected latency (benchmarks, tests) -----------------------------------

class RequestStats:
    """Requests and bytes a process made to one instrumented location (thread-safe counters)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.gets = self.get_bytes = self.puts = self.put_bytes = self.other = 0
            self.keys: dict[str, int] = {}  # key -> GETs of it

    def add_get(self, key: str, nbytes: int) -> None:
        with self._lock:
            self.gets += 1
            self.get_bytes += nbytes
            self.keys[key] = self.keys.get(key, 0) + 1

    def add_put(self, nbytes: int) -> None:
        with self._lock:
            self.puts += 1
            self.put_bytes += nbytes

    def add_other(self) -> None:
        with self._lock:
            self.other += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"gets": self.gets, "get_bytes": self.get_bytes, "puts": self.puts, "put_bytes": self.put_bytes,
                    "other": self.other}


_STATS: dict[str, RequestStats] = {}


def request_stats(name: str) -> RequestStats:
    """The counters of the locations instrumented under ``name`` in this process."""
    return _STATS.setdefault(name, RequestStats())


class InstrumentedStore(WrapperStore):
    """Counts every request to the wrapped store and sleeps ``latency_s`` before each one
    (standing in for a network round trip: requests issued concurrently overlap their waits)."""

    def __init__(self, store, stats: RequestStats | None = None, latency_s: float = 0.0):
        super().__init__(store)
        self.stats = stats if stats is not None else RequestStats()
        self.latency_s = latency_s

    def _with_store(self, store):
        return type(self)(store, self.stats, self.latency_s)

    async def _wait(self) -> None:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)

    async def get(self, key: str, prototype, byte_range: ByteRequest | None = None):
        await self._wait()
        value = await self._store.get(key, prototype, byte_range)
        self.stats.add_get(key, 0 if value is None else len(value))
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        await self._wait()
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), v in zip(key_ranges, values):
            self.stats.add_get(key, 0 if v is None else len(v))
        return values

    async def set(self, key: str, value) -> None:
        await self._wait()
        self.stats.add_put(len(value))
        await self._store.set(key, value)

    async def exists(self, key: str) -> bool:
        await self._wait()
        self.stats.add_other()
        return await self._store.exists(key)


# ---- locations ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreLocation:
    """A store's address: ``url`` is a local path (no scheme) or an fsspec URL.

    Picklable (it holds no handles): every process opens its own store with :meth:`open_store`.
    ``stats_name`` / ``latency_s`` wrap opened stores in an :class:`InstrumentedStore` whose
    counters are ``request_stats(stats_name)`` of the opening process.
    """

    url: str
    storage_options: dict = field(default_factory=dict)
    stats_name: str = ""
    latency_s: float = 0.0

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return not is_url(self.url)

    @property
    def path(self) -> Path:
        """The local directory (local locations only)."""
        if not self.is_local:
            raise StorageError(f"{self.url} is not a local path")
        return Path(self.url)

    @property
    def display(self) -> Path | str:
        """What messages and ``.path`` attributes show: a Path for local stores, else the URL."""
        return Path(self.url) if self.is_local else self.url

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def instrumented(self, stats_name: str, latency_s: float = 0.0) -> "StoreLocation":
        return replace(self, stats_name=stats_name, latency_s=latency_s)

    # ---- zarr stores ------------------------------------------------------------------------

    def open_store(self, *, read_only: bool):
        """A zarr store for this location, opened in the calling process."""
        if self.is_local:
            store = LocalStore(self.url, read_only=read_only)
        else:
            from zarr.storage import FsspecStore
            try:
                store = FsspecStore.from_url(self.url, storage_options=self.fsspec_options(), read_only=read_only)
            except (ImportError, ValueError) as e:
                scheme = self.url.split("://", 1)[0]
                hint = " (pip install 'sadpipe[remote]' for s3://)" if scheme in ("s3", "s3a") else ""
                raise StorageError(f"cannot open {self.url}: {e}{hint}") from e
        if self.stats_name or self.latency_s:
            store = InstrumentedStore(store, request_stats(self.stats_name or "default"), self.latency_s)
        return store

    def fsspec_options(self) -> dict:
        """The fsspec options of a URL location: sadpipe's defaults, then SADPIPE_STORAGE_OPTIONS, then
        the location's own."""
        return {**default_storage_options(self.url), **env_storage_options(), **self.storage_options}

    def open_group(self, mode: str) -> zarr.Group:
        # zarr_format=3: no requests probing for zarr v2 keys (.zgroup, .zattrs) of every node
        return zarr.open_group(self.open_store(read_only=mode == "r"), mode=mode, zarr_format=3)

    # ---- keys -------------------------------------------------------------------------------

    def has_key(self, key: str) -> bool:
        """True if the store holds ``key`` (e.g. the root ``zarr.json``)."""
        if self.is_local:
            return (self.path / key).is_file()
        return self.read_bytes(key) is not None  # a GET: no listing (cache) involved

    def is_store(self) -> bool:
        return self.has_key("zarr.json")

    def is_empty(self) -> bool:
        """Nothing there: no directory (or an empty one) locally, no object under the prefix remotely."""
        if self.is_local:
            p = self.path
            return not p.exists() or (p.is_dir() and not any(p.iterdir()))

        async def first():
            async for _ in self.open_store(read_only=True).list_prefix(""):
                return False
            return True

        return bool(sync(first()))

    def is_dir_or_absent(self) -> bool:
        """False only for a local path that is a file (object stores have no files at a prefix)."""
        return not self.is_local or not self.path.exists() or self.path.is_dir()

    def read_bytes(self, key: str) -> bytes | None:
        buf = sync(self.open_store(read_only=True).get(key, default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        store = self.open_store(read_only=False)
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def delete(self) -> None:
        """Delete the whole store (``--overwrite``)."""
        if self.is_local:
            shutil.rmtree(self.path)
        else:
            sync(self.open_store(read_only=False).delete_dir(""))

    def sizes(self) -> dict[str, int]:
        """Key (relative to the store, '/'-separated) -> size in bytes, for every key of the store."""
        if self.is_local:
            out = {}
            for dirpath, _, files in os.walk(self.path):
                for f in files:
                    full = os.path.join(dirpath, f)
                    out[Path(full).relative_to(self.path).as_posix()] = os.path.getsize(full)
            return out
        import fsspec  # installed with any filesystem package a URL store needs

        # zarr's store API has no sizes (one HEAD per key); fsspec's find lists the prefix with them,
        # one listing call per 1000 keys (a synchronous filesystem of its own, not the store's async one)
        fs, root = fsspec.url_to_fs(self.url, **self.fsspec_options())
        root = root.rstrip("/")
        found = fs.find(root, withdirs=False, detail=True)
        return {name[len(root) + 1:]: int(info.get("size") or 0) for name, info in found.items()
                if info.get("type", "file") != "directory"}

    def flush(self) -> None:
        """Make everything written so far durable before a later write vouches for it.

        Local: ``os.sync()`` (the completion mark must not reach the disk before the shard
        data). Object stores: nothing to do, a PUT is durable and visible once it returned."""
        if self.is_local and hasattr(os, "sync"):
            os.sync()


def store_location(value, storage_options: dict | None = None) -> StoreLocation:
    """A StoreLocation from a local path (str or Path), a ``file://`` URL, an fsspec URL, or a
    StoreLocation (returned as it is)."""
    if isinstance(value, StoreLocation):
        return value
    if isinstance(value, os.PathLike):
        return StoreLocation(os.fspath(value))
    if not isinstance(value, str) or not value:
        raise StorageError(f"a store location must be a path or a URL, got {value!r}")
    if value.lower().startswith("file://"):
        return StoreLocation(value[len("file://"):])
    if is_url(value):
        return StoreLocation(value.rstrip("/"), dict(storage_options or {}))
    return StoreLocation(value)


def url_or_path(value: str) -> Path | str:
    """CLI helper: URLs stay strings (a Path would fold ``s3://`` into ``s3:/``), the rest become Paths."""
    return value if is_url(value) else Path(value[len("file://"):] if value.lower().startswith("file://") else value)


__all__ = ["InstrumentedStore", "RequestStats", "StorageError", "StoreLocation", "env_storage_options", "is_url",
           "request_stats", "store_location", "url_or_path", "RangeByteRequest", "SuffixByteRequest"]
