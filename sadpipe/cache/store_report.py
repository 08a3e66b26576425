"""``verify`` and ``info`` for teacher-cache stores.

verify reads every shard of every array, so every per-chunk crc32c is checked (a flipped
byte anywhere in a shard file fails either an inner chunk's or the shard index's checksum),
and cross-checks the metadata: completion, statuses, counts, ids, consolidated index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from sadpipe.cache import format as fmt
from sadpipe.cache import targets as tg
from sadpipe.cache.format import CacheStoreError
from sadpipe.cache.reader import read_store_metadata
from sadpipe.cache.storage import store_location
from sadpipe.cache.writer import completion_index

MAX_LISTED = 20  # problems of one kind listed before summarising the rest


@dataclass
class VerifyReport:
    """ok is True iff problems is empty; each problem names the array/shard/image at fault."""

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    arrays_checked: int = 0

    def __str__(self) -> str:
        if self.ok:
            return (f"{self.path}: OK ({self.arrays_checked} arrays, "
                    f"{self.shards_checked} shards/chunks read, all checksums valid)")
        return f"{self.path}: {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)


def _read_blocks(arr: zarr.Array, layout: fmt.ArrayLayout, report: VerifyReport):
    """Yield (k, start, stop, data or None) for every shard (or chunk) of ``arr``."""
    n = layout.shape[0]
    step = layout.shards[0] if layout.shards else layout.chunks[0]
    unit = "shard" if layout.kind in ("per_shard", "sharded") else "chunk"
    for k, start in enumerate(range(0, n, step)):
        stop = min(n, start + step)
        report.shards_checked += 1
        try:
            yield k, start, stop, arr[start:stop]
        except Exception as e:  # checksum mismatch, truncated file, decompression error
            report.problems.append(
                f"{layout.name} {unit} {k} (images {start}..{stop - 1}): unreadable: {type(e).__name__}: {e}"
            )
            yield k, start, stop, None


def verify_store(path) -> VerifyReport:
    """Check completeness, every chunk's checksum and metadata consistency of the store
    (a local path, an fsspec URL or a StoreLocation)."""
    loc = store_location(path)
    report = VerifyReport(str(loc), ok=False)
    try:
        meta, mark = read_store_metadata(loc)
    except CacheStoreError as e:
        report.problems.append(str(e))
        return report
    if not (mark and mark.get("complete")):
        report.problems.append("no completion mark: the dump did not finish (rerun the same dump-teacher command)")
    root = loc.open_group("r")
    tables: dict[str, np.ndarray] = {}
    for layout in fmt.array_layouts(meta):  # plan, per-shard tables, then the big per-view arrays
        try:
            arr = root[layout.name]
        except KeyError:
            report.problems.append(f"{layout.name}: array missing")
            continue
        report.arrays_checked += 1
        if tuple(arr.shape) != layout.shape:
            report.problems.append(f"{layout.name}: shape {tuple(arr.shape)}, expected {layout.shape}")
            continue
        blocks = []
        for k, start, stop, data in _read_blocks(arr, layout, report):
            if layout.kind == "sharded":
                if data is not None and layout.name.endswith("/targets"):
                    _check_targets(layout.name, k, start, data, tables, meta["num_classes"], report)
            else:
                blocks.append(data)
        if layout.kind != "sharded" and all(b is not None for b in blocks):
            tables[layout.name] = np.concatenate(blocks) if blocks else np.zeros(layout.shape)
    _check_tables(meta, mark, tables, report)
    report.ok = not report.problems
    return report


def _check_targets(name: str, k: int, start: int, blobs: np.ndarray, tables: dict, num_classes: int,
                   report: VerifyReport) -> None:
    """Every ok image's record must unpack as its encoding and entry count say, and its entries must
    stay inside the image's A_i x K values; failed and pending images have no record."""
    view = name.split("/")[1]
    needed = ("images/num_anchors", "images/status", f"views/{view}/encoding", f"views/{view}/num_entries")
    if any(t not in tables for t in needed):
        return  # already reported as unreadable
    bad = []
    for j, blob in enumerate(blobs):
        i = start + j
        if tables["images/status"][i] != fmt.STATUS_OK:
            if len(blob):
                bad.append(i)
            continue
        encoding, m = int(tables[f"views/{view}/encoding"][i]), int(tables[f"views/{view}/num_entries"][i])
        n_values = int(tables["images/num_anchors"][i]) * num_classes
        try:
            deltas, codes = tg.unpack(blob, encoding, m)
        except ValueError:
            bad.append(i)
            continue
        if encoding == tg.DENSE and m != n_values:
            bad.append(i)
        elif encoding == tg.SPARSE and int(deltas.view(np.uint16).astype(np.int64).sum()) > n_values:
            bad.append(i)
    if bad:
        report.problems.append(
            f"{name} shard {k}: records inconsistent with their image's anchors or entry counts at plan positions "
            f"{bad[:MAX_LISTED]}"
        )


def _check_tables(meta: dict, mark: dict | None, tables: dict, report: VerifyReport) -> None:
    p = report.problems
    needed = ["images/image_id", "images/split", "images/path", "images/status", "images/num_anchors"]
    if any(name not in tables for name in needed):
        p.append("metadata checks skipped: per-image arrays unreadable")
        return
    ids, split, status = tables["images/image_id"], tables["images/split"], tables["images/status"]
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        p.append(f"images/image_id: duplicated ids {uniq[counts > 1][:MAX_LISTED].tolist()}")
    paths = tables["images/path"].tolist()
    if fmt.plan_sha256(ids, split, paths) != meta.get("plan_sha256"):
        p.append("images/image_id, split, path: plan does not match the plan_sha256 in the metadata")
    if not np.isin(split, list(fmt.SPLIT_NAMES)).all():
        p.append(f"images/split: unknown codes {sorted(set(split.tolist()) - set(fmt.SPLIT_NAMES))}")
    if not np.isin(status, list(fmt.STATUS_NAMES)).all():
        p.append(f"images/status: unknown codes {sorted(set(status.tolist()) - set(fmt.STATUS_NAMES))}")
    pending = np.flatnonzero(status == fmt.STATUS_PENDING)
    if pending.size:
        shards = np.unique(pending // meta["images_per_shard"]).tolist()
        p.append(f"{len(shards)} shard(s) not complete (pending images): {shards[:MAX_LISTED]}")
    ok = status == fmt.STATUS_OK
    a = tables["images/num_anchors"]
    bad = np.flatnonzero(ok & ((a < 1) | (a > meta["max_anchors"])))
    if bad.size:
        p.append(f"images/num_anchors out of [1, {meta['max_anchors']}] at image ids {ids[bad][:MAX_LISTED].tolist()}")
    if "images/failure" in tables:
        failure = tables["images/failure"].tolist()
        no_reason = [int(ids[i]) for i in np.flatnonzero(status == fmt.STATUS_FAILED) if not failure[i]]
        if no_reason:
            p.append(f"images/failure: failed images without a reason: {no_reason[:MAX_LISTED]}")
    for v in meta["views"]:
        name = f"views/{v}/det_count"
        if name in tables and ((tables[name] < 0) | (tables[name] > meta["max_detections"])).any():
            p.append(f"{name}: counts outside [0, {meta['max_detections']}]")
    if mark and mark.get("complete"):
        for name in fmt.per_shard_array_names(meta):
            copy = tables.get(fmt.index_name(name))
            if name in tables and copy is not None and not np.array_equal(tables[name], copy):
                p.append(f"{fmt.index_name(name)}: consolidated index differs from {name}")
        if all(name in tables for name in fmt.per_shard_array_names(meta)):
            expected = completion_index(meta, split, tables)
            for key in ("num_images", "by_status", "by_split", "by_view"):
                if mark.get(key) != expected[key]:
                    p.append(f"completion mark {key} = {mark.get(key)} but the arrays give {expected[key]}")


def _prefix_bytes(sizes: dict[str, int], prefix: str, chunks_only: bool = False) -> int:
    """Bytes of the keys under ``prefix`` ("" for all; without the zarr.json files if chunks_only)."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    return sum(n for key, n in sizes.items()
               if key.startswith(prefix) and not (chunks_only and key.rsplit("/", 1)[-1] == "zarr.json"))


def store_info(path) -> dict:
    """Summary of a store (a local path, an fsspec URL or a StoreLocation): counts, failures,
    sizes in storage, compression, teacher, layout, codec."""
    loc = store_location(path)
    meta, mark = read_store_metadata(loc)
    complete = bool(mark and mark.get("complete"))
    root = loc.open_group("r")
    sizes = loc.sizes()  # one listing of the store (not one request per object)
    # A complete store has the consolidated index (few reads); otherwise read the per-shard arrays.
    def table(name):
        return root[fmt.index_name(name) if complete else name][:]

    ids, split = root["images/image_id"][:], root["images/split"][:]
    status, num_anchors = table("images/status"), table("images/num_anchors").astype(np.int64)
    failure = table("images/failure").tolist()
    paths = root["images/path"][:].tolist()
    ok = status == fmt.STATUS_OK
    n_values = int(num_anchors[ok].sum()) * meta["num_classes"]
    arrays = {a.name: _prefix_bytes(sizes, a.name, chunks_only=True) for a in fmt.array_layouts(meta)}
    views = {}
    for v in meta["views"]:
        cls_bytes = arrays[f"views/{v}/targets"]
        view_bytes = _prefix_bytes(sizes, f"views/{v}")
        encoding = table(f"views/{v}/encoding")
        entries = table(f"views/{v}/num_entries").astype(np.int64)
        views[v] = {
            "ok_images": int(ok.sum()),
            "bytes": view_bytes,
            "targets_bytes": cls_bytes,
            "bytes_per_image": view_bytes / max(1, int(ok.sum())),
            "bits_per_value": 8.0 * cls_bytes / n_values if n_values else None,
            "ratio_to_float32": 4.0 * n_values / cls_bytes if cls_bytes else None,
            "sparse_images": int((ok & (encoding == tg.SPARSE)).sum()),
            "dense_images": int((ok & (encoding == tg.DENSE)).sum()),
            "mean_sparse_entries": float(entries[ok & (encoding == tg.SPARSE)].mean())
            if (ok & (encoding == tg.SPARSE)).any() else 0.0,
        }
    total = _prefix_bytes(sizes, "")
    return {
        "path": str(loc),
        "format_version": meta["format_version"],
        "complete": complete,
        "completed_at": mark.get("completed_at") if mark else None,
        "num_images": int(ids.size),
        "num_shards": meta["num_shards"],
        "images_per_shard": meta["images_per_shard"],
        "splits": fmt.counts_by_split(split, status, ("ok", "failed", "pending")),
        "ok": int(ok.sum()),
        "failed": int((status == fmt.STATUS_FAILED).sum()),
        "pending": int((status == fmt.STATUS_PENDING).sum()),
        "failed_images": [
            {"image_id": int(ids[i]), "path": paths[i], "reason": failure[i]}
            for i in np.flatnonzero(status == fmt.STATUS_FAILED)
        ],
        "bytes_total": total,
        "bytes_per_image": total / max(1, int(ids.size)),
        "bytes_per_array": arrays,
        "views": views,
        "num_classes": meta["num_classes"],
        "max_anchors": meta["max_anchors"],
        "mean_anchors_per_image": float(num_anchors[ok].mean()) if ok.any() else 0.0,
        "teacher": meta["teacher"],
        "anchor_layout": meta["anchor_layout"],
        "codec": meta["codec"],
        "preprocessing": meta["preprocessing"],
        "classes": meta["classes"],
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_store_info(info: dict, max_failed: int = 20) -> str:
    """Human-readable text of a store_info() dict."""
    state = f"complete ({info['completed_at']})" if info["complete"] else f"INCOMPLETE ({info['pending']} images pending)"
    lines = [
        f"teacher cache {info['path']}  (format v{info['format_version']}, {state})",
        f"teacher: {info['teacher']}",
        f"codec: {info['codec']}",
        f"anchor layout: {info['anchor_layout']}",
        f"images: {info['num_images']} in {info['num_shards']} shards of {info['images_per_shard']}; "
        f"ok {info['ok']}, failed {info['failed']}, pending {info['pending']}",
    ]
    for name, s in info["splits"].items():
        lines.append(f"  {name:10s} {s['images']:8d} images  ok {s['ok']}  failed {s['failed']}  pending {s['pending']}")
    lines.append(f"size on disk: {_size(info['bytes_total'])} ({_size(info['bytes_per_image'])} per image), "
                 f"{info['num_classes']} classes, {info['mean_anchors_per_image']:.0f} anchors per image on average")
    for v, s in info["views"].items():
        bits = "n/a" if s["bits_per_value"] is None else f"{s['bits_per_value']:.2f}"
        ratio = "n/a" if s["ratio_to_float32"] is None else f"{s['ratio_to_float32']:.1f}x"
        lines.append(f"  view {v:8s} {_size(s['bytes'])} ({_size(s['bytes_per_image'])} per image); "
                     f"teacher targets {_size(s['targets_bytes'])}: {bits} bits per value, {ratio} smaller than float32; "
                     f"{s['sparse_images']} sparse records (mean {s['mean_sparse_entries']:.0f} entries), "
                     f"{s['dense_images']} dense")
    if info["failed_images"]:
        lines.append(f"failed images ({len(info['failed_images'])}):")
        for f in info["failed_images"][:max_failed]:
            lines.append(f"  {f['image_id']}  {f['path']}: {f['reason']}")
        if len(info["failed_images"]) > max_failed:
            lines.append(f"  ... and {len(info['failed_images']) - max_failed} more")
    return "\n".join(lines)
