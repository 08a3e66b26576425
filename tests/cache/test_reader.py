"""TeacherCache: refusals (incomplete, unknown version, unknown id/view, failed image),
check_compatible messages, and use across fork and pickling (DataLoader workers)."""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest
import torch
import zarr

from sadpipe.cache.codec import codec_from_dict
from sadpipe.cache.reader import (
    CacheMismatchError,
    FailedImageError,
    IncompleteStoreError,
    NotAStoreError,
    TeacherCache,
    UnsupportedFormatError,
)
from sadpipe.cache.writer import StoreWriter

from . import CLASSES, LAYOUT, PREPROCESSING, make_result, make_spec, shard_results, write_all

FAILED = {2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "c.zarr"
    spec = make_spec(n=9, images_per_shard=4)
    writer = StoreWriter.create_or_resume(path, spec)
    write_all(writer, spec, FAILED)
    writer.finalize()
    return path, spec


def test_incomplete_store_is_refused(tmp_path):
    spec = make_spec(n=8, images_per_shard=4)
    writer = StoreWriter.create_or_resume(tmp_path / "c.zarr", spec)
    writer.write_shard(0, shard_results(writer, spec, 0))
    with pytest.raises(IncompleteStoreError, match="dump not finished; rerun the same dump-teacher command"):
        TeacherCache(tmp_path / "c.zarr")
    writer.write_shard(1, shard_results(writer, spec, 1))  # all shards written but not finalised
    with pytest.raises(IncompleteStoreError):
        TeacherCache(tmp_path / "c.zarr")
    writer.finalize()
    assert len(TeacherCache(tmp_path / "c.zarr")) == 8


def test_missing_path_and_unknown_format_version(tmp_path, store):
    with pytest.raises(NotAStoreError, match="no zarr.json"):
        TeacherCache(tmp_path / "nowhere.zarr")
    spec = make_spec(n=4, images_per_shard=4)
    writer = StoreWriter.create_or_resume(tmp_path / "v.zarr", spec)
    write_all(writer, spec)
    writer.finalize()
    root = zarr.open_group(tmp_path / "v.zarr", mode="r+")
    meta = dict(root.attrs["sadpipe"])
    meta["format_version"] = 99
    root.attrs["sadpipe"] = meta
    with pytest.raises(UnsupportedFormatError, match="format version 99"):
        TeacherCache(tmp_path / "v.zarr")


def test_unknown_id_view_and_failed_image(store):
    path, spec = store
    cache = TeacherCache(path)
    with pytest.raises(KeyError, match="image id 424242 is not in teacher cache"):
        cache[424242]
    assert 424242 not in cache and spec.image_ids[0] in cache
    with pytest.raises(KeyError, match="view 'rot90'"):
        cache.get(spec.image_ids[0], view="rot90")
    failed_id = spec.image_ids[2]
    with pytest.raises(FailedImageError, match=f"failed for image id {failed_id}.*cannot identify image file"):
        cache.get(failed_id, view="hflip")
    assert cache.status(failed_id) == "failed" and cache.status(spec.image_ids[0]) == "ok"
    assert cache.failed_images == {failed_id: f"cannot identify image file for {failed_id}"}
    # plan positions 0..4 are labeled (60 % of 9 -> 5), position 2 failed
    assert cache.ok_image_ids("labeled") == [spec.image_ids[i] for i in (0, 1, 3, 4)]
    assert cache.ok_image_ids("unlabeled") == spec.image_ids[5:]


def test_get_without_detections_and_box_regression(store):
    path, spec = store
    cache = TeacherCache(path)
    rec = cache.get(spec.image_ids[1], detections=False, box_regression=False)
    assert rec.det_boxes is None and rec.box_regression is None
    codec = codec_from_dict(spec.metadata["codec"])
    assert torch.equal(rec.cls_logits, codec.decode(make_result(spec, 1).views["orig"].cls_codes).float())


def test_check_compatible_accepts_matching_and_names_each_difference(store):
    path, _ = store
    cache = TeacherCache(path)
    # tuples instead of lists must not matter (AnchorLayout.to_dict may give either)
    cache.check_compatible(layout={**LAYOUT, "strides": (8, 16)}, category_ids=CLASSES["category_ids"],
                           class_names=CLASSES["names"], preprocessing=PREPROCESSING)

    with pytest.raises(CacheMismatchError) as err:
        cache.check_compatible(layout={**LAYOUT, "sizes": [16.0, 32.0]}, category_ids=CLASSES["category_ids"],
                               preprocessing=PREPROCESSING)
    msg = str(err.value)
    assert "anchor layout differs" in msg and "sizes: [32.0, 64.0] (cache) vs [16.0, 32.0] (student)" in msg
    assert "classes" not in msg and "preprocessing" not in msg

    with pytest.raises(CacheMismatchError) as err:
        cache.check_compatible(layout=LAYOUT, category_ids=[1, 3, 8], class_names=["circle", "square", "star"],
                               preprocessing={**PREPROCESSING, "min_size": 800})
    msg = str(err.value)
    assert "classes differ" in msg and "only in cache [7], only in student [8]" in msg
    assert "'triangle' vs 'star'" in msg
    assert "preprocessing differs: min_size: 64 (cache) vs 800 (student)" in msg
    assert "anchor layout" not in msg


def _child_reads(image_ids, queue):
    cache_from_parent = _PARENT_CACHE[0]  # inherited through fork, handles opened in the parent
    out = []
    for image_id in image_ids:
        rec = cache_from_parent.get(image_id, view="hflip")
        out.append((image_id, rec.cls_logits.numpy().copy(), rec.det_scores.numpy().copy()))
    queue.put(out)


_PARENT_CACHE: list = []


def test_works_across_fork_and_pickle(store):
    path, spec = store
    cache = TeacherCache(path)
    ok_ids = cache.ok_image_ids()
    cache.get(ok_ids[0])  # open handles in the parent before forking
    _PARENT_CACHE[:] = [cache]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child_reads, args=(ok_ids[r::2], queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    codec = codec_from_dict(spec.metadata["codec"])
    seen = set()
    for image_id, logits, scores in (item for batch in results for item in batch):
        expected = make_result(spec, spec.image_ids.index(image_id), FAILED).views["hflip"]
        assert np.array_equal(logits, codec.decode(expected.cls_codes).float().numpy())
        assert np.array_equal(scores, expected.det_scores)
        seen.add(image_id)
    assert seen == set(ok_ids)

    clone = pickle.loads(pickle.dumps(cache))  # what a spawned DataLoader worker receives
    assert clone._readers == {} and clone._store is None and torch.equal(clone[ok_ids[1]].cls_logits, cache[ok_ids[1]].cls_logits)
