"""Create a teacher-cache store, write whole shards, resume, finalise (completion mark last).

Safety rules (docs/zarr_notes.md, section "Concurrent writes to one shard"; docs/cache_format.md):
- only whole store shards are written, and each shard has one writer (rank k % world_size),
  because two processes writing inner chunks of one zarr shard lose data;
- inside a shard, ``images/status`` is written last, so a shard is complete iff its status
  chunk holds no pending entry; a crash mid-shard leaves it pending and it is rewritten;
- the completion mark (root attribute ``sadpipe_completion``) is written last by
  :meth:`StoreWriter.finalize`; zarr's LocalStore writes every file to a temp file and
  renames it over the target, so the root ``zarr.json`` is either the old or the new one.
  On an object store (S3, GCS, ...) every key is one PUT of the whole object, which readers
  see entirely or not at all: the same guarantee without a rename (sadpipe/cache/storage.py).
"""

from __future__ import annotations

import datetime as _dt
import logging
import warnings
from typing import Sequence

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.dtype import VariableLengthBytes
from zarr.errors import UnstableSpecificationWarning

import sadpipe
from sadpipe.cache import format as fmt
from sadpipe.cache import targets as tg
from sadpipe.cache.codec import codec_from_dict
from sadpipe.cache.storage import StoreLocation, store_location
from sadpipe.cache.format import (
    COMPLETION_ATTR,
    METADATA_ATTR,
    ImageResult,
    IncompleteStoreError,
    NotAStoreError,
    StoreMismatchError,
    StoreSpec,
    StoreWriteError,
)

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on the GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def build_metadata(spec: StoreSpec) -> dict:
    """Validate ``spec`` and return the root metadata dict stored under attrs["sadpipe"]."""
    n = spec.num_images
    if n == 0:
        raise ValueError("the dump plan is empty: no images to dump")
    if not (len(spec.splits) == len(spec.paths) == n):
        raise ValueError(
            f"plan lengths differ: {n} image_ids, {len(spec.splits)} splits, {len(spec.paths)} paths"
        )
    ids = np.asarray(spec.image_ids, dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][:10].tolist()
        raise ValueError(f"image ids must be unique in the plan; duplicated: {dup}")
    views = tuple(spec.views)
    if not views or len(set(views)) != len(views) or any(not v or "/" in v for v in views):
        raise ValueError(f"views must be distinct non-empty names without '/', got {views}")
    for name in ("num_classes", "max_anchors", "num_levels", "images_per_shard", "max_detections"):
        if int(getattr(spec, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    missing = [k for k in fmt.REQUIRED_METADATA_KEYS if k not in spec.metadata]
    if missing:
        raise ValueError(f"StoreSpec.metadata lacks required keys {missing} (a store must describe itself)")
    clash = [k for k in fmt.STRUCTURAL_KEYS if k in spec.metadata]
    if clash:
        raise ValueError(f"StoreSpec.metadata must not set {clash}: the writer computes them")
    codes = fmt.split_codes(spec.splits)
    meta = {
        "format_version": fmt.FORMAT_VERSION,
        "sadpipe_version": sadpipe.__version__,
        "created_at": _now(),
        "num_images": n,
        "plan_sha256": fmt.plan_sha256(ids, codes, spec.paths),
        "views": list(views),
        "num_classes": int(spec.num_classes),
        "max_anchors": int(spec.max_anchors),
        "num_levels": int(spec.num_levels),
        "images_per_shard": int(spec.images_per_shard),
        "num_shards": fmt.num_shards(n, int(spec.images_per_shard)),
        "max_detections": int(spec.max_detections),
        "with_box_regression": bool(spec.with_box_regression),
    }
    meta.update(spec.metadata)
    meta = fmt.to_json_value(meta)
    fmt.zstd_level(meta)  # fails early on an unknown codec
    return meta


class StoreWriter(fmt.StoreMetadata):
    """Writes one teacher-cache store. Get one with :meth:`create_or_resume` (rank 0) or
    :meth:`open` (other ranks, after rank 0 created the store and a barrier)."""

    def __init__(self, location: StoreLocation, root: zarr.Group, meta: dict, summary: str):
        self.location = location
        self.path = location.display  # a Path for local stores, else the URL
        self._root = root
        self.metadata = meta
        self.resume_summary = summary  # one line for the user: created / resuming / complete
        self._arrays = {a.name: root[a.name] for a in fmt.array_layouts(meta)}
        self._image_ids = self._arrays["images/image_id"][:]
        self._codec = codec_from_dict(meta["codec"])

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def create_or_resume(cls, path, spec: StoreSpec, *, overwrite: bool = False) -> "StoreWriter":
        """Create the store at ``path``, or reopen it for resume if it was created with the
        same fixed metadata (plan, teacher, codec, layout, config). Rank 0 only.

        ``path``: a local directory, an fsspec URL (``s3://bucket/prefix/cache.zarr``) or a
        StoreLocation."""
        loc = store_location(path)
        path = loc.display
        meta = build_metadata(spec)
        # the root zarr.json first (one GET): listing a big store's prefix to see it is not empty
        # would cost one request per 1000 objects
        is_store = loc.is_dir_or_absent() and loc.is_store()
        if is_store or not loc.is_empty():
            if overwrite:
                if not is_store:
                    raise NotAStoreError(
                        f"{path} exists and is not a zarr store; refusing to delete it with --overwrite. "
                        "Choose another output path."
                    )
                loc.delete()
            elif is_store:
                return cls._resume(loc, meta)
            else:
                raise NotAStoreError(
                    f"{path} exists and is not a sadpipe teacher cache; choose another output path"
                )
        return cls._create(loc, meta, spec)

    @classmethod
    def _create(cls, loc: StoreLocation, meta: dict, spec: StoreSpec) -> "StoreWriter":
        path = loc.display
        compressors = [ZstdCodec(level=fmt.zstd_level(meta)), Crc32cCodec()]
        try:
            root = loc.open_group(mode="w")
            for a in fmt.array_layouts(meta):
                with warnings.catch_warnings():
                    # zarr warns that variable-length bytes have no zarr v3 specification yet;
                    # zarr-python reads and writes them (docs/cache_format.md)
                    warnings.simplefilter("ignore", UnstableSpecificationWarning)
                    root.create_array(
                        a.name, shape=a.shape,
                        dtype=VariableLengthBytes() if a.dtype == fmt.VLEN_BYTES else a.dtype,
                        chunks=a.chunks, shards=a.shards, fill_value=a.fill_value, compressors=compressors,
                    )
            root["images/image_id"][:] = np.asarray(spec.image_ids, dtype=np.int64)
            root["images/split"][:] = fmt.split_codes(spec.splits)
            root["images/path"][:] = np.array([str(p) for p in spec.paths], dtype=object)
            # The metadata goes in last: a store without it is an interrupted creation.
            root.attrs[METADATA_ATTR] = meta
        except OSError as e:
            raise StoreWriteError(
                f"could not create the teacher cache at {path}: {e}. Free space or fix the path, "
                "then rerun with --overwrite."
            ) from e
        log.info("created teacher cache %s (%d images, %d shards)", path, meta["num_images"], meta["num_shards"])
        return cls(loc, root, meta, f"created new teacher cache {path}")

    @classmethod
    def _resume(cls, loc: StoreLocation, meta: dict) -> "StoreWriter":
        path = loc.display
        root = loc.open_group(mode="r+")
        stored = root.attrs.get(METADATA_ATTR)
        if stored is None:
            raise StoreMismatchError(
                f"{path} is a zarr store without sadpipe metadata (an interrupted creation or "
                "another tool's store); use --overwrite to replace it"
            )
        diffs = fmt.diff_dicts(stored, meta, "existing store", "this run", skip=fmt.NOT_COMPARED_ON_RESUME)
        if diffs:
            raise StoreMismatchError(
                f"{path} already holds a teacher cache made with different settings:\n  "
                + "\n  ".join(diffs)
                + "\nuse --overwrite to replace it (deletes the existing cache), or choose another output path"
            )
        writer = cls(loc, root, stored, "")
        if writer.is_complete:
            writer.resume_summary = f"teacher cache {path} is already complete; nothing to do"
        else:
            pending = len(writer.pending_shards())
            writer.resume_summary = (
                f"resuming teacher cache {path}: {pending} of {writer.num_shards} shards still to write"
            )
        log.info(writer.resume_summary)
        return writer

    @classmethod
    def open(cls, path) -> "StoreWriter":
        """Open an existing store for writing (ranks > 0, after rank 0's create_or_resume)."""
        loc = store_location(path)
        path = loc.display
        if not loc.is_store():
            raise NotAStoreError(f"{path} is not a teacher cache (no zarr.json); rank 0 must create it first")
        root = loc.open_group(mode="r+")
        meta = root.attrs.get(METADATA_ATTR)
        if meta is None:
            raise NotAStoreError(f"{path} has no sadpipe metadata; rank 0 must create it first")
        return cls(loc, root, meta, f"opened teacher cache {path}")

    # ---- shards -------------------------------------------------------------------------

    @property
    def is_complete(self) -> bool:
        mark = self._root.attrs.get(COMPLETION_ATTR)
        return bool(mark and mark.get("complete"))

    def image_id(self, index: int) -> int:
        return int(self._image_ids[index])

    def shard_indices(self, k: int) -> range:
        """Plan positions of store shard k."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range [0, {self.num_shards})")
        return fmt.shard_range(k, self.num_images, self.images_per_shard)

    def _shard_done(self) -> np.ndarray:
        """bool [num_shards]: shard k holds no pending status."""
        status = self._arrays["images/status"][:]
        s = self.images_per_shard
        done = np.ones(self.num_shards, dtype=bool)
        pending = np.flatnonzero(status == fmt.STATUS_PENDING)
        done[np.unique(pending // s)] = False
        return done

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards owned by ``rank`` (k % world_size == rank) that are not complete."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        done = self._shard_done()
        return [k for k in range(rank, self.num_shards, world_size) if not done[k]]

    def write_shard(self, k: int, results: Sequence[ImageResult]) -> None:
        """Write store shard k whole: every per-view and per-image array, status last.

        results must hold exactly one ImageResult per plan position of the shard.
        Raises StoreWriteError on OSError (disk full...), ValueError on malformed results.
        """
        if self.is_complete:
            raise fmt.CacheStoreError(f"{self.path} is already complete; refusing to modify it")
        idx = self.shard_indices(k)
        blocks = self._assemble(k, idx, results)
        try:
            for name, block in blocks.items():  # insertion order ends with images/status
                self._arrays[name][idx.start : idx.stop] = block
        except OSError as e:
            raise StoreWriteError(
                f"writing shard {k} (images {idx.start}..{idx.stop - 1}) of {self.path} failed: {e}. "
                "The store is resumable: free space or fix the disk, then rerun the same dump command."
            ) from e

    def _assemble(self, k: int, idx: range, results: Sequence[ImageResult]) -> dict[str, np.ndarray]:
        m = self.metadata
        n_k, a_max, d_max, levels = len(idx), m["max_anchors"], m["max_detections"], m["num_levels"]
        by_index: dict[int, ImageResult] = {}
        for r in results:
            if r.index in by_index:
                raise ValueError(f"shard {k}: plan position {r.index} given twice")
            by_index[r.index] = r
        if set(by_index) != set(idx):
            missing = sorted(set(idx) - set(by_index))[:10]
            extra = sorted(set(by_index) - set(idx))[:10]
            raise ValueError(
                f"shard {k} covers plan positions {idx.start}..{idx.stop - 1}; results are missing {missing} "
                f"and include positions outside it {extra}"
            )
        blocks: dict[str, np.ndarray] = {}
        views = {}
        for v in self.views:
            views[v] = {
                "targets": np.array([b""] * n_k, dtype=object),
                "box_regression": np.zeros((n_k, a_max, 4), np.float16) if m["with_box_regression"] else None,
                "detections": np.zeros((n_k, d_max, len(fmt.DETECTION_COLUMNS)), np.float32),
                "encoding": np.zeros(n_k, np.uint8),
                "num_entries": np.zeros(n_k, np.int32),
                "background": np.zeros(n_k, np.float32),
                "det_count": np.zeros(n_k, np.int16),
            }
        failure = np.array([""] * n_k, dtype=object)
        hw = {key: np.zeros((n_k, 2), np.int32) for key in ("orig_hw", "resized_hw", "padded_hw")}
        grid = np.zeros((n_k, levels, 2), np.int32)
        num_anchors = np.zeros(n_k, np.int32)
        status = np.zeros(n_k, np.uint8)
        for j, i in enumerate(idx):
            r = by_index[i]
            where = f"shard {k}, plan position {i} (image id {r.image_id})"
            if int(r.image_id) != int(self._image_ids[i]):
                raise ValueError(f"{where}: the plan has image id {int(self._image_ids[i])} there")
            if r.status == "failed":
                status[j] = fmt.STATUS_FAILED
                failure[j] = r.failure or "unknown error"
                continue
            if r.status != "ok":
                raise ValueError(f"{where}: status must be 'ok' or 'failed', got {r.status!r}")
            status[j] = fmt.STATUS_OK
            a_i = int(r.num_anchors)
            if not 0 < a_i <= a_max:
                raise ValueError(f"{where}: num_anchors {a_i} not in [1, max_anchors={a_max}]")
            num_anchors[j] = a_i
            for key in hw:
                hw[key][j] = _as_numpy(getattr(r, key))
            g = _as_numpy(r.grid_hw) if r.grid_hw is not None else None
            if g is None or g.shape != (levels, 2):
                raise ValueError(f"{where}: grid_hw must have shape ({levels}, 2), got {None if g is None else g.shape}")
            grid[j] = g
            if set(r.views) != set(self.views):
                raise ValueError(f"{where}: views {sorted(r.views)} but the store has {sorted(self.views)}")
            for v, out in views.items():
                self._fill_view(out, j, r.views[v], a_i, f"{where}, view {v!r}")
        for v, out in views.items():
            for short in ("targets", "box_regression", "detections"):
                if out[short] is not None:
                    blocks[f"views/{v}/{short}"] = out[short]
        blocks["images/failure"] = failure
        for key, arr in hw.items():
            blocks[f"images/{key}"] = arr
        blocks["images/grid_hw"] = grid
        blocks["images/num_anchors"] = num_anchors
        for v, out in views.items():
            for short in fmt.PER_VIEW_SMALL_ARRAYS:
                blocks[f"views/{v}/{short}"] = out[short]
        blocks["images/status"] = status  # last: marks the shard complete
        return blocks

    def _fill_view(self, out: dict, j: int, vr, a_i: int, where: str) -> None:
        m = self.metadata
        n_values = a_i * m["num_classes"]
        if isinstance(vr.cls_codes, tuple):
            encoding, deltas, codes = vr.cls_codes
        else:
            dense = _as_numpy(vr.cls_codes)
            if dense.dtype != np.uint8 or dense.shape != (a_i, m["num_classes"]):
                raise ValueError(
                    f"{where}: cls_codes must be uint8 [{a_i}, {m['num_classes']}], got {dense.dtype} {list(dense.shape)}"
                )
            encoding, deltas, codes = tg.compact_from_codes(dense)
        codes = np.asarray(codes, dtype=np.uint8)
        if encoding == tg.DENSE and codes.size != n_values:
            raise ValueError(f"{where}: dense codes hold {codes.size} values, expected {a_i} x {m['num_classes']}")
        if encoding == tg.SPARSE and (deltas.shape != codes.shape
                                      or int(np.asarray(deltas, np.int64).sum()) > n_values):
            raise ValueError(f"{where}: sparse codes: {deltas.size} deltas, {codes.size} codes, summing past "
                             f"{n_values} values")
        n0, n1 = tg.code_counts(codes, n_values)
        out["targets"][j] = tg.pack(encoding, deltas, codes)
        out["encoding"][j] = encoding
        out["num_entries"][j] = codes.size
        out["background"][j] = self._codec.background_logit(n0, n1)
        if m["with_box_regression"]:
            if vr.box_regression is None:
                raise ValueError(f"{where}: the store keeps box_regression but it is None")
            box = _as_numpy(vr.box_regression)
            if box.shape != (a_i, 4):
                raise ValueError(f"{where}: box_regression must be [{a_i}, 4], got {list(box.shape)}")
            out["box_regression"][j, :a_i] = box.astype(np.float16)
        boxes, scores, labels = _as_numpy(vr.det_boxes), _as_numpy(vr.det_scores), _as_numpy(vr.det_labels)
        d = scores.shape[0] if scores.ndim == 1 else -1
        if d < 0 or boxes.shape != (d, 4) or labels.shape != (d,):
            raise ValueError(
                f"{where}: detections must be boxes [d, 4], scores [d], labels [d]; got "
                f"{list(boxes.shape)}, {list(scores.shape)}, {list(labels.shape)}"
            )
        if d > m["max_detections"]:
            raise ValueError(f"{where}: {d} detections exceed max_detections={m['max_detections']}")
        if d and (labels.min() < 0 or labels.max() >= m["num_classes"]):
            raise ValueError(f"{where}: detection labels must be in [0, {m['num_classes']})")
        out["detections"][j, :d, :4] = boxes
        out["detections"][j, :d, 4] = scores
        out["detections"][j, :d, 5] = labels
        out["det_count"][j] = d

    # ---- completion ---------------------------------------------------------------------

    def finalize(self) -> dict:
        """Check every shard is complete, write the consolidated index, then the completion
        mark (last). Idempotent: a complete store returns its existing mark. Rank 0 only."""
        mark = self._root.attrs.get(COMPLETION_ATTR)
        if mark and mark.get("complete"):
            return mark
        done = self._shard_done()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise IncompleteStoreError(
                f"{self.path}: {missing.size} of {self.num_shards} shards are not written yet "
                f"(first: {missing[:10].tolist()}); rerun the same dump command to finish them"
            )
        try:
            tables = {}
            for name in fmt.per_shard_array_names(self.metadata):  # status last
                tables[name] = self._arrays[name][:]
                self._arrays[fmt.index_name(name)][:] = tables[name]
            mark = completion_index(self.metadata, self._root["images/split"][:], tables)
            # shard data reaches the disk before the mark that vouches for it (os.sync locally;
            # on an object store every PUT above was durable and visible when it returned)
            self.location.flush()
            self._root.attrs[COMPLETION_ATTR] = mark
        except OSError as e:
            raise StoreWriteError(
                f"finalising {self.path} failed: {e}. The store is resumable: free space, then rerun "
                "the same dump command."
            ) from e
        log.info("teacher cache %s complete: %s", self.path, mark["by_status"])
        return mark


def completion_index(meta: dict, split: np.ndarray, tables: dict[str, np.ndarray]) -> dict:
    """The completion mark: counts per status, split and view (JSON dict)."""
    status = tables["images/status"]
    ok = status == fmt.STATUS_OK
    by_view = {
        v: {"ok": int(ok.sum()), "detections": int(tables[f"views/{v}/det_count"].astype(np.int64).sum())}
        for v in meta["views"]
    }
    return {
        "completion_version": fmt.COMPLETION_VERSION,
        "complete": True,
        "completed_at": _now(),
        "num_images": int(status.size),
        "by_status": {"ok": int(ok.sum()), "failed": int((status == fmt.STATUS_FAILED).sum())},
        "by_split": fmt.counts_by_split(split, status, ("ok", "failed")),
        "by_view": by_view,
    }
