"""Teacher-cache store layout: array names, dtypes, chunking, metadata keys, version.

The full description for humans is docs/cache_format.md; this module is its single source
of truth in code. The writer, the reader and ``verify``/``info`` all derive the list of
arrays from the stored root metadata with :func:`array_layouts`, so they cannot disagree.

One store = one teacher over a fixed, ordered plan of N images. Image index i in [0, N) is
the plan position (axis 0 of every per-image array); joins outside the store are by image id.
"Store shard k" = images [k*S, (k+1)*S) = chunk/shard k of every per-shard array.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sadpipe.cache.codec import codec_from_dict
from sadpipe.config import config_differences, short_repr  # noqa: F401  (short_repr: part of this module's API)
from sadpipe.errors import UserError

# Version 2: compact teacher targets (sparse entries above the background bin, cache/targets.py)
# and packed detections; version 1 stored dense [A_max, K] codes per image.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (2,)
COMPLETION_VERSION = 1

# Root group attribute keys.
METADATA_ATTR = "sadpipe"  # fixed at creation
COMPLETION_ATTR = "sadpipe_completion"  # written last by finalize

# images/status values. 0 is the fill value, so a never-written status chunk reads as pending.
STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_OK: "ok", STATUS_FAILED: "failed"}
SPLIT_CODES = {"labeled": 0, "unlabeled": 1}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}

# Arrays written once at creation (the plan) and the consolidated index written by finalize
# have large chunks: each has a single writer, and readers load them whole in a few reads.
TABLE_CHUNK_IMAGES = 65536

# Metadata keys the caller must provide in StoreSpec.metadata (the store must describe itself).
REQUIRED_METADATA_KEYS = ("anchor_layout", "preprocessing", "classes", "teacher", "codec")
# Keys the writer computes; the caller must not set them.
STRUCTURAL_KEYS = (
    "format_version", "sadpipe_version", "created_at", "num_images", "plan_sha256", "views",
    "num_classes", "max_anchors", "num_levels", "images_per_shard", "num_shards",
    "max_detections", "with_box_regression",
)
# Keys that may differ between the run that created a store and a run that resumes it.
NOT_COMPARED_ON_RESUME = ("created_at", "sadpipe_version")


class CacheStoreError(UserError):
    """Base class of all teacher-cache store errors."""


class NotAStoreError(CacheStoreError):
    """The path is missing or is not a sadpipe teacher-cache store."""


class UnsupportedFormatError(CacheStoreError):
    """The store was written with a format version this sadpipe cannot read."""


class IncompleteStoreError(CacheStoreError):
    """The dump has not finished (no completion mark, or shards still pending)."""


class StoreMismatchError(CacheStoreError):
    """An existing store was created for a different plan/teacher/codec/config."""


class StoreWriteError(CacheStoreError):
    """Writing a shard failed (disk full, I/O error); the store stays resumable."""


class CacheMismatchError(CacheStoreError):
    """The cache does not match the student's anchors, classes or preprocessing."""


class FailedImageError(CacheStoreError):
    """The teacher dump failed for this image; the reason is in the message."""


def _metadata_entry(key: str, doc: str, convert: Callable[[Any], Any] = lambda v: v) -> property:
    """A read-only property: ``convert(self.metadata[key])``."""
    return property(lambda self: convert(self.metadata[key]), doc=doc)


class StoreMetadata:
    """Named read access to ``self.metadata``, a store's root metadata (fixed at creation), for the
    classes that hold one: the reader (TeacherCache) and the writer (StoreWriter)."""

    metadata: dict
    num_images = _metadata_entry("num_images", "N, the images of the plan (int)")
    images_per_shard = _metadata_entry("images_per_shard", "S, the images of one store shard (int)")
    num_shards = _metadata_entry("num_shards", "ceil(N / S) (int)")
    views = _metadata_entry("views", "the view names, e.g. ('orig', 'hflip') (tuple of str)", tuple)
    num_classes = _metadata_entry("num_classes", "K, the class channels of the teacher (int)")
    anchor_layout = _metadata_entry("anchor_layout", "the teacher's AnchorLayout.to_dict() (dict)")
    preprocessing = _metadata_entry("preprocessing", "the teacher's preprocessing (dict)")


@dataclass
class StoreSpec:
    """Everything fixed when a store is created.

    image_ids: N ints (unique), the plan order. splits: N of "labeled"/"unlabeled" (or 0/1).
    paths: N source file paths. views: view names, e.g. ("orig", "hflip").
    max_anchors: A_max >= every image's num_anchors. num_levels: L (FPN levels).
    images_per_shard: S. max_detections: D.
    metadata: must hold ``anchor_layout`` (AnchorLayout.to_dict()), ``preprocessing`` (dict),
    ``classes`` ({"category_ids": [...], "names": [...]}), ``teacher`` (e.g. {"arch": ...,
    "checkpoint_sha256": ...}), ``codec`` (codec.to_dict()); optional ``config`` (resolved
    config), ``anchor_layout_fingerprint`` and anything else JSON-serialisable.
    """

    image_ids: list[int]
    splits: list[str | int]
    paths: list[str]
    views: tuple[str, ...]
    num_classes: int
    max_anchors: int
    num_levels: int
    images_per_shard: int
    max_detections: int
    with_box_regression: bool
    metadata: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


@dataclass
class ViewResult:
    """Teacher outputs for one image in one view (num_anchors = A_i, d <= D detections).

    cls_codes: uint8 [A_i, K] (codec.encode of the logits), or already compact: the tuple
    (encoding, deltas uint16 [M], codes uint8) of ``targets.compact_from_codes`` (the dump makes
    it on the teacher's device so only compact arrays reach the host).
    box_regression: float16 [A_i, 4] or None (None iff the store has no box regression).
    det_boxes: float32 [d, 4] (x1, y1, x2, y2) in resized-image pixels; det_scores float32 [d];
    det_labels: int [d], contiguous labels in [0, K).
    """

    cls_codes: np.ndarray | tuple
    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray
    box_regression: np.ndarray | None = None


@dataclass
class ImageResult:
    """One image's dump result.

    index: plan position; image_id must equal the plan's id there. status: "ok" or "failed"
    (failed images carry a reason and no views). orig_hw/resized_hw/padded_hw: (h, w).
    grid_hw: int [L, 2] feature-grid size per level. views: view name -> ViewResult.
    """

    index: int
    image_id: int
    status: str = "ok"
    failure: str = ""
    orig_hw: tuple[int, int] = (0, 0)
    resized_hw: tuple[int, int] = (0, 0)
    padded_hw: tuple[int, int] = (0, 0)
    grid_hw: np.ndarray | None = None
    num_anchors: int = 0
    views: dict[str, ViewResult] = field(default_factory=dict)

    @classmethod
    def failed(cls, index: int, image_id: int, reason: str) -> "ImageResult":
        return cls(index=index, image_id=image_id, status="failed", failure=reason or "unknown error")


@dataclass(frozen=True)
class ArrayLayout:
    """One zarr array of the store (dtype VLEN_BYTES: zarr's variable-length bytes).

    kind: "plan" (written once at creation), "per_shard" (small per-image arrays, one chunk
    per store shard), "sharded" (per-view data, inner chunk = 1 image, shard = S images) or
    "index" (consolidated copy of a per_shard array, written by finalize).
    """

    name: str
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    fill_value: Any
    kind: str


VLEN_BYTES = "variable_length_bytes"
# views/{v}/detections columns: box (x1, y1, x2, y2) in resized pixels, score, contiguous label.
DETECTION_COLUMNS = ("x1", "y1", "x2", "y2", "score", "label")

# Small per-image arrays written with each shard (images/status is appended last by per_shard_array_names).
PER_SHARD_IMAGE_ARRAYS = (
    "images/failure", "images/orig_hw", "images/resized_hw", "images/padded_hw",
    "images/grid_hw", "images/num_anchors",
)

# Small per-image, per-view arrays (see targets.py for encoding / num_entries / background).
PER_VIEW_SMALL_ARRAYS = ("encoding", "num_entries", "background", "det_count")


def num_shards(num_images: int, images_per_shard: int) -> int:
    return -(-num_images // images_per_shard)


def shard_range(k: int, num_images: int, images_per_shard: int) -> range:
    """Plan positions of store shard k (the last shard may be short)."""
    return range(k * images_per_shard, min((k + 1) * images_per_shard, num_images))


def index_name(per_shard_name: str) -> str:
    """Name of the consolidated copy of a per-shard array, e.g. images/status -> index/images/status."""
    return "index/" + per_shard_name


def per_shard_array_names(meta: dict) -> list[str]:
    """Small per-image arrays written with every shard (status last), consolidated by finalize."""
    names = list(PER_SHARD_IMAGE_ARRAYS)
    for v in meta["views"]:
        names += [f"views/{v}/{short}" for short in PER_VIEW_SMALL_ARRAYS]
    return names + ["images/status"]


def array_layouts(meta: dict) -> list[ArrayLayout]:
    """All arrays of a store described by its root metadata ``meta`` (see docs/cache_format.md)."""
    n, s = meta["num_images"], meta["images_per_shard"]
    a_max, levels, d = meta["max_anchors"], meta["num_levels"], meta["max_detections"]
    table = (max(1, min(n, TABLE_CHUNK_IMAGES)),)
    out = [
        ArrayLayout("images/image_id", (n,), "int64", table, None, 0, "plan"),
        ArrayLayout("images/split", (n,), "uint8", table, None, 0, "plan"),
        ArrayLayout("images/path", (n,), str, table, None, "", "plan"),
    ]
    small = {
        "images/failure": ((n,), str, ""),
        "images/orig_hw": ((n, 2), "int32", 0),
        "images/resized_hw": ((n, 2), "int32", 0),
        "images/padded_hw": ((n, 2), "int32", 0),
        "images/grid_hw": ((n, levels, 2), "int32", 0),
        "images/num_anchors": ((n,), "int32", 0),
        "images/status": ((n,), "uint8", STATUS_PENDING),
    }
    for v in meta["views"]:
        small[f"views/{v}/encoding"] = ((n,), "uint8", 0)
        small[f"views/{v}/num_entries"] = ((n,), "int32", 0)
        small[f"views/{v}/background"] = ((n,), "float32", 0.0)
        small[f"views/{v}/det_count"] = ((n,), "int16", 0)
    for name in per_shard_array_names(meta):
        shape, dtype, fill = small[name]
        out.append(ArrayLayout(name, shape, dtype, (s,) + shape[1:], None, fill, "per_shard"))
        out.append(ArrayLayout(index_name(name), shape, dtype, table + shape[1:], None, fill, "index"))
    for v in meta["views"]:
        per_view = [("targets", (), VLEN_BYTES, b"")]
        if meta["with_box_regression"]:
            per_view.append(("box_regression", (a_max, 4), "float16", 0.0))
        per_view.append(("detections", (d, len(DETECTION_COLUMNS)), "float32", 0.0))
        for short, inner, dtype, fill in per_view:
            out.append(ArrayLayout(
                f"views/{v}/{short}", (n,) + inner, dtype, (1,) + inner, (s,) + inner, fill, "sharded",
            ))
    return out


def zstd_level(meta: dict) -> int:
    return int(codec_from_dict(meta["codec"]).zstd_level)


def plan_sha256(image_ids, split_codes, paths) -> str:
    """Fingerprint of the ordered plan (ids, splits, paths); equal plans give equal hashes."""
    h = hashlib.sha256()
    h.update(np.asarray(image_ids, dtype="<i8").tobytes())
    h.update(np.asarray(split_codes, dtype="u1").tobytes())
    for p in paths:
        h.update(str(p).encode("utf-8") + b"\0")
    return h.hexdigest()


def split_codes(splits) -> np.ndarray:
    """N split names ("labeled"/"unlabeled") or codes (0/1) -> uint8 [N] codes."""
    out = np.empty(len(splits), dtype=np.uint8)
    for i, s in enumerate(splits):
        if isinstance(s, str):
            if s not in SPLIT_CODES:
                raise ValueError(f"unknown split {s!r} for plan position {i}; expected one of {sorted(SPLIT_CODES)}")
            out[i] = SPLIT_CODES[s]
        elif int(s) in SPLIT_NAMES:
            out[i] = int(s)
        else:
            raise ValueError(f"unknown split code {s!r} for plan position {i}; expected 0 (labeled) or 1 (unlabeled)")
    return out


def counts_by_split(split: np.ndarray, status: np.ndarray, statuses: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Split name -> ``{"images": n, <status>: n for each status named in statuses}`` (names of
    STATUS_NAMES, in that order) from the uint8 [N] ``images/split`` and ``images/status`` arrays."""
    codes = {name: code for code, name in STATUS_NAMES.items()}
    out = {}
    for code, name in SPLIT_NAMES.items():
        sel = split == code
        out[name] = {"images": int(sel.sum()), **{s: int((sel & (status == codes[s])).sum()) for s in statuses}}
    return out


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):  # TOML dates in the resolved config
        return obj.isoformat()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def to_json_value(value):
    """The value as it reads back from zarr attributes (tuples -> lists, Paths -> str)."""
    return json.loads(json.dumps(value, default=_json_default))


def diff_dicts(a: dict, b: dict, a_name: str, b_name: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Human lines "key: <a> (a_name) vs <b> (b_name)" for every differing leaf of two metadata
    dicts as they read back from zarr attributes; top-level sections in ``skip`` are not compared."""
    return config_differences(to_json_value(a), to_json_value(b), a_name, b_name,
                              ignore=lambda key: key.split(".")[0] in skip)


def read_metadata(location) -> dict | None:
    """The root metadata of the store at ``location`` (a StoreLocation), or None when there is no store there."""
    if not location.is_store():
        return None
    return location.open_group("r").attrs.get(METADATA_ATTR)
