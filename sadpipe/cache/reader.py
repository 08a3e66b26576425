"""``TeacherCache``: read-only access to a finished teacher-cache store, by image id.

Safe in DataLoader workers and in many processes at once: the small per-image tables are
numpy arrays (inherited by forked workers, picklable for spawned ones) and the zarr array
handles are (re)opened lazily in each process (tracked by ``os.getpid()``). Per record the
reader touches one inner chunk (one image) of each per-view array, never whole arrays: one
range request per array and image, after one request for its shard's index per shard and
process (sadpipe/cache/shards.py); with a shard order (``set_shard_order``) whole shards are
read ahead in the background instead.

The store may be a local directory or an fsspec URL such as ``s3://bucket/prefix/cache.zarr``
(sadpipe/cache/storage.py); nothing else changes.

Two ways to read teacher targets:
- ``get_compact`` returns :class:`~sadpipe.cache.targets.CompactTargets`, the stored entries
  above the background bin (cost proportional to them); the student's loader ships those and
  decodes them on the training device (``targets.decode`` with ``code_table(cache.codec)``).
- ``get`` returns a :class:`CacheRecord` with dense float32 logits, for any other training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from sadpipe.cache import format as fmt
from sadpipe.cache import targets as tg
from sadpipe.cache.codec import codec_from_dict
from sadpipe.cache.shards import ShardedArrayReader, ShardReadAhead
from sadpipe.cache.storage import StoreLocation, store_location
from sadpipe.cache.format import (
    COMPLETION_ATTR,
    METADATA_ATTR,
    CacheMismatchError,
    FailedImageError,
    IncompleteStoreError,
    NotAStoreError,
    UnsupportedFormatError,
)

__all__ = [
    "CacheRecord", "TeacherCache", "CacheMismatchError", "FailedImageError",
    "IncompleteStoreError", "NotAStoreError", "UnsupportedFormatError", "read_store_metadata",
]


@dataclass
class CacheRecord:
    """One image's teacher outputs in one view (A = the image's own number of anchors).

    cls_logits: float32 [A, K] decoded logits; box_regression: float32 [A, 4] or None;
    det_boxes float32 [d, 4] (x1, y1, x2, y2, resized pixels), det_scores float32 [d],
    det_labels int64 [d] (None if get(..., detections=False)); sizes are (h, w); path is the stored
    one, relative to the dump's data root (``TeacherCache.image_file`` resolves it);
    grid_sizes: one (h, w) per FPN level.
    """

    image_id: int
    split: str
    path: str
    view: str
    status: str
    cls_logits: torch.Tensor
    box_regression: torch.Tensor | None
    det_boxes: torch.Tensor | None
    det_scores: torch.Tensor | None
    det_labels: torch.Tensor | None
    orig_size: tuple[int, int]
    resized_size: tuple[int, int]
    padded_size: tuple[int, int]
    grid_sizes: list[tuple[int, int]]

    @property
    def num_anchors(self) -> int:
        return int(self.cls_logits.shape[0])


def read_store_metadata(path) -> tuple[dict, dict | None]:
    """(root metadata, completion mark or None) of the store at ``path`` (a local path, an fsspec
    URL or a StoreLocation).

    Raises NotAStoreError (missing / not a sadpipe store) or UnsupportedFormatError.
    """
    loc = store_location(path)
    path = loc.display
    if not loc.is_store():
        raise NotAStoreError(f"{path} is not a teacher cache (no zarr.json); check the path")
    attrs = loc.open_group("r").attrs
    meta = attrs.get(METADATA_ATTR)
    if meta is None:
        raise NotAStoreError(
            f"{path} is a zarr store without sadpipe metadata (creation was interrupted, or another tool wrote it)"
        )
    version = meta.get("format_version")
    if version == 1:
        raise UnsupportedFormatError(
            f"{path} is a version-1 teacher cache (dense codes per anchor); this sadpipe reads version "
            f"{fmt.FORMAT_VERSION} (compact targets: docs/cache_format.md). Re-dump the teacher into a new "
            "store with the same `sadpipe dump-teacher` command and another --out (or --overwrite)."
        )
    if version not in fmt.SUPPORTED_FORMAT_VERSIONS:
        raise UnsupportedFormatError(
            f"{path} has teacher-cache format version {version}; this sadpipe reads "
            f"{list(fmt.SUPPORTED_FORMAT_VERSIONS)}. Upgrade sadpipe or re-dump the teacher."
        )
    return meta, attrs.get(COMPLETION_ATTR)


class TeacherCache(fmt.StoreMetadata):
    """Read-only teacher cache. ``cache[image_id]`` is ``cache.get(image_id, view="orig")``.

    A failed image (teacher could not read it) raises FailedImageError from ``get``; filter
    the dataset with ``ok_image_ids()`` or ``status(image_id)`` first.
    """

    def __init__(self, path):
        self.location: StoreLocation = store_location(path)
        self.path = self.location.display  # a Path for local stores, else the URL
        meta, mark = read_store_metadata(self.location)
        if not (mark and mark.get("complete")):
            raise IncompleteStoreError(
                f"teacher cache {self.path}: dump not finished; rerun the same dump-teacher command to resume"
            )
        self.metadata = meta
        self.completion = mark
        self.codec = codec_from_dict(meta["codec"])
        self.code_table = tg.code_table(self.codec)  # float32 [256]; move to the device to decode there
        self._tables: dict[str, np.ndarray] | None = None
        self._id_to_index: dict[int, int] | None = None
        self._shard_order: tuple[list[int], int] | None = None
        self._reset_handles()

    # ---- lazy opening ---------------------------------------------------------------

    def _reset_handles(self) -> None:
        self._store = None
        self._readers: dict[str, ShardedArrayReader] = {}
        self._readahead: ShardReadAhead | None = None
        self._pid: int | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_store", "_readers", "_readahead", "_pid"):  # handles are reopened in the new process
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_handles()

    def clone(self) -> "TeacherCache":
        """Another reader of the same store sharing the loaded tables, with its own handles and
        shard order (e.g. one per training stream)."""
        other = TeacherCache.__new__(TeacherCache)
        other.__setstate__(self.__getstate__())
        other._shard_order = None
        return other

    def set_shard_order(self, order, window: int) -> None:
        """Announce that records will be read shard by shard in ``order`` (store shard numbers),
        mixing ``window`` consecutive shards at a time (sadpipe/shard_sampler.py): reads then
        fetch whole shards and read the next ones ahead in the background. ``order=None``
        returns to one range request per record. Takes effect in processes started (or forked)
        after the call, and at once in this one."""
        self._shard_order = None if order is None else ([int(k) for k in order], int(window))
        if self._readahead is not None:
            self._readahead.close()
        self._readahead = None
        self._readers = {}

    def _open_store(self):
        if self._pid != os.getpid():  # first use, or first use after a fork
            self._reset_handles()
            self._pid = os.getpid()
        if self._store is None:
            self._store = self.location.open_store(read_only=True)
        return self._store

    def _load_tables(self) -> dict[str, np.ndarray]:
        if self._tables is None:
            root = zarr.open_group(self._open_store(), mode="r", zarr_format=3)
            tables = {name: root[name][:] for name in ("images/image_id", "images/split", "images/path")}
            for name in fmt.per_shard_array_names(self.metadata):
                tables[name] = root[fmt.index_name(name)][:]
            for name in ("images/path", "images/failure"):
                tables[name] = np.asarray(tables[name].tolist(), dtype=object)
            self._id_to_index = {int(x): i for i, x in enumerate(tables["images/image_id"].tolist())}
            self._tables = tables
        return self._tables

    def _read(self, name: str, i: int) -> np.ndarray:
        """Image i's inner chunk of the sharded array ``name``: [1, ...]."""
        store = self._open_store()
        reader = self._readers.get(name)
        if reader is None:
            max_shards = 2 * self._shard_order[1] + 1 if self._shard_order else 0
            reader = self._readers[name] = ShardedArrayReader(store, name, max_shards=max_shards)
        if self._shard_order is None:
            return reader.read(i)
        if self._readahead is None:
            self._readahead = ShardReadAhead(*self._shard_order)
        return self._readahead.read(reader, i)

    # ---- plan and per-image facts ---------------------------------------------------

    def __len__(self) -> int:
        return self.num_images

    def __contains__(self, image_id) -> bool:
        self._load_tables()
        return int(image_id) in self._id_to_index

    @property
    def image_ids(self) -> list[int]:
        """All image ids in plan order (ok and failed)."""
        return self._load_tables()["images/image_id"].tolist()

    @property
    def splits(self) -> dict[str, list[int]]:
        """Split name ("labeled"/"unlabeled") -> image ids in plan order."""
        t = self._load_tables()
        return {
            name: t["images/image_id"][t["images/split"] == code].tolist()
            for code, name in fmt.SPLIT_NAMES.items()
        }

    def ok_image_ids(self, split: str | None = None) -> list[int]:
        """Ids of images the teacher dumped successfully, optionally of one split."""
        t = self._load_tables()
        sel = t["images/status"] == fmt.STATUS_OK
        if split is not None:
            if split not in fmt.SPLIT_CODES:
                raise ValueError(f"unknown split {split!r}; expected one of {sorted(fmt.SPLIT_CODES)}")
            sel &= t["images/split"] == fmt.SPLIT_CODES[split]
        return t["images/image_id"][sel].tolist()

    @property
    def failed_images(self) -> dict[int, str]:
        """image id -> failure reason."""
        t = self._load_tables()
        idx = np.flatnonzero(t["images/status"] == fmt.STATUS_FAILED)
        return {int(t["images/image_id"][i]): str(t["images/failure"][i]) for i in idx}

    def index_of(self, image_id) -> int:
        """Plan position of ``image_id``; KeyError if the cache does not hold it."""
        self._load_tables()
        try:
            return self._id_to_index[int(image_id)]
        except KeyError:
            sample = self.image_ids[:5]
            raise KeyError(
                f"image id {image_id} is not in teacher cache {self.path} ({len(self)} images, e.g. ids "
                f"{sample}); was the cache dumped for this dataset split?"
            ) from None

    def status(self, image_id) -> str:
        """"ok" or "failed"."""
        i = self.index_of(image_id)
        return fmt.STATUS_NAMES[int(self._tables["images/status"][i])]

    def image_facts(self, image_id) -> dict:
        """What the store records of the image (no per-view read): path (relative to the data
        root at dump time), split, status, sizes (h, w) and num_anchors."""
        i = self.index_of(image_id)
        t = self._tables
        return {"path": str(t["images/path"][i]), "split": fmt.SPLIT_NAMES[int(t["images/split"][i])],
                "status": fmt.STATUS_NAMES[int(t["images/status"][i])],
                "orig_size": tuple(int(x) for x in t["images/orig_hw"][i]),
                "resized_size": tuple(int(x) for x in t["images/resized_hw"][i]),
                "padded_size": tuple(int(x) for x in t["images/padded_hw"][i]),
                "num_anchors": int(t["images/num_anchors"][i])}

    def image_file(self, image_id, data_root=None) -> Path:
        """The image's file: its stored path under ``data_root`` (default: the data root the dump
        used, from the stored config), or the stored path itself when it is absolute."""
        stored = Path(self.image_facts(image_id)["path"])
        if stored.is_absolute():
            return stored
        if data_root is None:
            data_root = ((self.metadata.get("config") or {}).get("data") or {}).get("root") or "."
        return Path(data_root).expanduser() / stored

    def split_of(self, image_id) -> str:
        i = self.index_of(image_id)
        return fmt.SPLIT_NAMES[int(self._tables["images/split"][i])]

    # ---- records --------------------------------------------------------------------

    def _checked(self, image_id, view: str) -> int:
        i = self.index_of(image_id)
        if view not in self.views:
            raise KeyError(f"view {view!r} is not in teacher cache {self.path}; it has {list(self.views)}")
        t = self._tables
        if t["images/status"][i] != fmt.STATUS_OK:
            raise FailedImageError(
                f"the teacher dump failed for image id {image_id} ({t['images/path'][i]}): "
                f"{t['images/failure'][i]}"
            )
        return i

    def get_compact(self, image_id, view: str = "orig") -> tg.CompactTargets:
        """The image's teacher targets as stored (CPU tensors): one inner-chunk read, no decode.
        ``targets.decode(record.to(device), cache.code_table.to(device))`` gives the float32
        logits [A, K] on any device."""
        i = self._checked(image_id, view)
        return self._compact(i, view)

    def _compact(self, i: int, view: str) -> tg.CompactTargets:
        t = self._tables
        encoding = int(t[f"views/{view}/encoding"][i])
        m = int(t[f"views/{view}/num_entries"][i])
        blob = self._read(f"views/{view}/targets", i)[0]
        try:
            deltas, codes = tg.unpack(blob, encoding, m)
        except ValueError as e:
            raise fmt.CacheStoreError(f"teacher cache {self.path}: record {i} of view {view!r} is corrupt ({e}); "
                                      "run `sadpipe cache verify` on it") from None
        return tg.CompactTargets(
            deltas=torch.from_numpy(deltas.copy()), codes=torch.from_numpy(codes.copy()),
            background=float(t[f"views/{view}/background"][i]), num_anchors=int(t["images/num_anchors"][i]),
            num_classes=self.num_classes, encoding=encoding,
        )

    def get_box_regression(self, image_id, view: str = "orig") -> torch.Tensor:
        """The teacher's box deltas, float16 [A, 4] in the image's anchor order (stores dumped
        with ``--with-box-regression``; others raise CacheStoreError saying so)."""
        i = self._checked(image_id, view)
        if not self.metadata["with_box_regression"]:
            raise fmt.CacheStoreError(f"teacher cache {self.path} has no box regression: re-dump with "
                                      "`sadpipe dump-teacher --with-box-regression`")
        return self._box_regression(i, view)

    def _box_regression(self, i: int, view: str) -> torch.Tensor:
        a = int(self._tables["images/num_anchors"][i])
        return torch.from_numpy(np.ascontiguousarray(self._read(f"views/{view}/box_regression", i)[0, :a]))

    def get_codes(self, image_id, view: str = "orig") -> np.ndarray:
        """Codec codes as a dense uint8 [A, K] array (the image's own anchor rows)."""
        c = self.get_compact(image_id, view)
        return tg.dense_codes(c.encoding, c.deltas.numpy(), c.codes.numpy(),
                              c.num_anchors * c.num_classes).reshape(c.num_anchors, c.num_classes)

    def get_detections(self, image_id, view: str = "orig") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's stored detections: boxes float32 [d, 4] (x1, y1, x2, y2, resized pixels),
        scores float32 [d], labels int64 [d] (one inner-chunk read)."""
        return self._detections(self._checked(image_id, view), view)

    def _detections(self, i: int, view: str):
        d = int(self._tables[f"views/{view}/det_count"][i])
        rows = self._read(f"views/{view}/detections", i)[0, :d] if d else np.zeros((0, 6), np.float32)
        return (torch.from_numpy(np.ascontiguousarray(rows[:, :4])), torch.from_numpy(np.ascontiguousarray(rows[:, 4])),
                torch.from_numpy(rows[:, 5].astype(np.int64)))

    def get(self, image_id, view: str = "orig", *, box_regression: bool = True,
            detections: bool = True) -> CacheRecord:
        """The record of ``image_id`` in ``view`` with dense float32 logits decoded on the CPU.
        Each per-view array costs one inner-chunk read (~1-2 ms); pass box_regression=False /
        detections=False to skip those reads (the fields are then None)."""
        i = self._checked(image_id, view)
        t = self._tables
        box = None
        if box_regression and self.metadata["with_box_regression"]:
            box = self._box_regression(i, view).float()
        det_boxes, det_scores, det_labels = self._detections(i, view) if detections else (None, None, None)
        return CacheRecord(
            image_id=int(t["images/image_id"][i]),
            split=fmt.SPLIT_NAMES[int(t["images/split"][i])],
            path=str(t["images/path"][i]),
            view=view,
            status="ok",
            cls_logits=tg.decode(self._compact(i, view), self.code_table),
            box_regression=box,
            det_boxes=det_boxes,
            det_scores=det_scores,
            det_labels=det_labels,
            orig_size=tuple(int(x) for x in t["images/orig_hw"][i]),
            resized_size=tuple(int(x) for x in t["images/resized_hw"][i]),
            padded_size=tuple(int(x) for x in t["images/padded_hw"][i]),
            grid_sizes=[(int(h), int(w)) for h, w in t["images/grid_hw"][i]],
        )

    def __getitem__(self, image_id) -> CacheRecord:
        return self.get(image_id, view="orig")

    # ---- compatibility --------------------------------------------------------------

    def check_compatible(self, *, layout: dict, category_ids, class_names=None, preprocessing: dict) -> None:
        """Raise CacheMismatchError naming every difference between this cache and the
        student's anchor layout (AnchorLayout.to_dict()), classes and preprocessing."""
        problems = []
        lines = fmt.diff_dicts(self.anchor_layout, layout, "cache", "student")
        if lines:
            problems.append("anchor layout differs: " + "; ".join(lines))
        classes = self.metadata["classes"]
        cached_ids = [int(c) for c in classes.get("category_ids", [])]
        student_ids = [int(c) for c in category_ids]
        if cached_ids != student_ids:
            only_cache = sorted(set(cached_ids) - set(student_ids))
            only_student = sorted(set(student_ids) - set(cached_ids))
            detail = (
                f"only in cache {only_cache[:10]}, only in student {only_student[:10]}"
                if only_cache or only_student
                else "same ids in a different order"
            )
            problems.append(
                f"classes differ: cache has {len(cached_ids)} category ids {fmt.short_repr(cached_ids)}, "
                f"student has {len(student_ids)} {fmt.short_repr(student_ids)} ({detail})"
            )
        cached_names = classes.get("names")
        if class_names is not None and cached_names is not None and list(cached_names) != list(class_names):
            diff = [
                f"{a!r} vs {b!r}" for a, b in zip(cached_names, class_names) if a != b
            ][:5]
            problems.append(
                f"class names differ (cache vs student): {', '.join(diff) or 'different number of names'}"
            )
        lines = fmt.diff_dicts(self.preprocessing, preprocessing, "cache", "student")
        if lines:
            problems.append("preprocessing differs: " + "; ".join(lines))
        if problems:
            raise CacheMismatchError(
                f"teacher cache {self.path} does not match the student:\n  - "
                + "\n  - ".join(problems)
                + "\nRe-dump the teacher with the student's settings, or point to the matching cache."
            )
