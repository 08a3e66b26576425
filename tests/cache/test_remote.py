"""Teacher caches on S3 (moto's server on 127.0.0.1): the writer's guarantees, the reader's request
count, verify, refusal of unfinished stores, and many reader processes at once."""

from __future__ import annotations

import hashlib
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401 (fixtures)

from sadpipe.cache.codec import codec_from_dict
from sadpipe.cache.format import CacheStoreError, IncompleteStoreError, NotAStoreError
from sadpipe.cache.store_report import store_info, verify_store
from sadpipe.cache.reader import FailedImageError, TeacherCache
from sadpipe.cache.storage import request_stats, store_location, url_or_path
from sadpipe.cache.writer import StoreWriter
from sadpipe.cli import main

from . import make_result, make_spec, shard_results, write_all

FAILED = {3, 9}


def _finished(path, spec, failed=FAILED):
    writer = StoreWriter.create_or_resume(path, spec)
    write_all(writer, spec, failed)
    writer.finalize()
    return writer


def test_locations_from_paths_and_urls(tmp_path):
    assert store_location("s3://bkt/a/cache.zarr/").url == "s3://bkt/a/cache.zarr"
    assert not store_location("s3://bkt/a/cache.zarr").is_local
    assert store_location(f"file://{tmp_path}/c.zarr").path == tmp_path / "c.zarr"
    assert store_location(tmp_path / "c.zarr").is_local
    assert url_or_path("s3://bkt/x") == "s3://bkt/x"  # a Path would fold it into "s3:/bkt/x"
    assert url_or_path("runs/c.zarr") == Path("runs/c.zarr")


def test_round_trip_on_s3_equals_the_local_store(new_bucket, tmp_path):
    spec = make_spec(n=10, images_per_shard=4)  # 3 shards, the last one short
    url = f"s3://{new_bucket}/prefix/c.zarr"
    _finished(url, spec)
    _finished(tmp_path / "c.zarr", spec)
    remote, local = TeacherCache(url), TeacherCache(tmp_path / "c.zarr")
    assert remote.path == url and remote.ok_image_ids() == local.ok_image_ids()
    codec = codec_from_dict(spec.metadata["codec"])
    for i in np.random.default_rng(0).permutation(10):
        image_id = spec.image_ids[i]
        if i in FAILED:
            with pytest.raises(FailedImageError):
                remote.get_compact(image_id)
            continue
        expected = make_result(spec, int(i))
        for view in spec.views:
            rec = remote.get(image_id, view)
            ev = expected.views[view]
            assert torch.equal(rec.cls_logits, codec.decode(ev.cls_codes).float())
            assert torch.equal(rec.box_regression, torch.from_numpy(ev.box_regression.astype(np.float32)))
            assert torch.equal(rec.det_boxes, torch.from_numpy(ev.det_boxes))
            assert rec.det_labels.tolist() == ev.det_labels.tolist()
            a, b = remote.get_compact(image_id, view), local.get_compact(image_id, view)
            assert torch.equal(a.deltas, b.deltas) and torch.equal(a.codes, b.codes) and a.background == b.background
    assert verify_store(url).ok
    info_r, info_l = store_info(url), store_info(tmp_path / "c.zarr")
    # the same chunk bytes in both places: sizes from an S3 listing equal those from os.walk
    assert info_r["bytes_per_array"] == info_l["bytes_per_array"]
    assert info_r["views"]["orig"]["ratio_to_float32"] == info_l["views"]["orig"]["ratio_to_float32"]
    assert info_r["ok"] == 8 and info_r["path"] == url


def test_shard_index_is_read_once_per_shard_and_each_record_in_one_request(new_bucket):
    spec = make_spec(n=12, images_per_shard=4, views=("orig",))  # shards 0, 1, 2 of 4 images
    url = f"s3://{new_bucket}/c.zarr"
    _finished(url, spec, failed=set())
    stats = request_stats("test-once")
    cache = TeacherCache(store_location(url).instrumented("test-once"))
    cache.ok_image_ids()  # tables (consolidated index arrays) first
    stats.reset()
    order = np.random.default_rng(1).permutation(12).tolist()
    for i in order:
        cache.get_compact(spec.image_ids[i])
        cache.get_detections(spec.image_ids[i])
    for name in ("targets", "detections"):
        for k in range(3):
            key = f"views/orig/{name}/c/{k}" + ("/0/0" if name == "detections" else "")
            # one suffix request for the shard's index, then one range request per image read
            images_with_data = sum(1 for i in range(4 * k, 4 * k + 4)
                                   if name == "targets" or len(make_result(spec, i).views["orig"].det_scores))
            assert stats.keys.get(key, 0) == 1 + images_with_data, (key, stats.keys)
    # besides those: each array's zarr.json once
    assert stats.gets == sum(stats.keys.values())
    assert sum(1 for key in stats.keys if key.endswith("zarr.json")) == 2

    # with a shard order: whole shards, each fetched once, read ahead in the background
    stats = request_stats("test-ahead")
    ahead = TeacherCache(store_location(url).instrumented("test-ahead"))
    ahead.ok_image_ids()
    ahead.set_shard_order([2, 0, 1], window=1)
    stats.reset()
    for k in (2, 0, 1):
        for i in np.random.default_rng(k).permutation(range(4 * k, 4 * k + 4)).tolist():
            a, b = ahead.get_compact(spec.image_ids[i]), cache.get_compact(spec.image_ids[i])
            assert torch.equal(a.deltas, b.deltas) and torch.equal(a.codes, b.codes)
    target_keys = {key: n for key, n in stats.keys.items() if key.startswith("views/orig/targets/c/")}
    assert target_keys == {f"views/orig/targets/c/{k}": 1 for k in range(3)}


def test_a_flipped_byte_in_an_s3_object_is_caught(new_bucket):
    spec = make_spec(n=10, images_per_shard=4)
    url = f"s3://{new_bucket}/c.zarr"
    _finished(url, spec)
    s3 = s3_client()
    key = "c.zarr/views/hflip/targets/c/1"  # store shard 1: images 4..7
    raw = bytearray(s3.get_object(Bucket=new_bucket, Key=key)["Body"].read())
    raw[len(raw) // 3] ^= 0x10  # inside an inner chunk's data
    s3.put_object(Bucket=new_bucket, Key=key, Body=bytes(raw))
    report = verify_store(url)
    assert not report.ok and len(report.problems) == 1
    assert report.problems[0].startswith("views/hflip/targets shard 1 (images 4..7)") and "checksum" in report.problems[0]
    cache = TeacherCache(url)
    bad = 0
    for i in range(4, 8):  # the reader's own range reads check the crc32c too
        try:
            cache.get_compact(spec.image_ids[i], "hflip")
        except CacheStoreError as e:
            assert "run `sadpipe cache verify`" in str(e)
            bad += 1
    assert bad == 1
    result = CliRunner().invoke(main, ["cache", "verify", url])
    assert result.exit_code == 1 and "checksum" in result.output


def test_an_unfinished_s3_store_is_refused_then_resumed_after_a_crash(new_bucket):
    spec = make_spec(n=14, images_per_shard=4)  # shards 0..3
    url = f"s3://{new_bucket}/run/c.zarr"
    writer = StoreWriter.create_or_resume(url, spec)
    writer.write_shard(0, shard_results(writer, spec, 0))

    class CrashOnStatus:
        def __setitem__(self, key, value):
            raise RuntimeError("simulated crash")

    writer._arrays["images/status"] = CrashOnStatus()
    with pytest.raises(RuntimeError, match="simulated crash"):
        writer.write_shard(2, shard_results(writer, spec, 2))  # every array of shard 2 but its status
    assert "run/c.zarr/views/orig/targets/c/2" in {o["Key"] for o in s3_client().list_objects_v2(
        Bucket=new_bucket, Prefix="run/c.zarr/views/orig/targets/")["Contents"]}
    with pytest.raises(IncompleteStoreError, match="dump not finished; rerun the same dump-teacher command"):
        TeacherCache(url)
    assert any("no completion mark" in p for p in verify_store(url).problems)
    result = CliRunner().invoke(main, ["cache", "info", url])
    assert result.exit_code == 0 and "INCOMPLETE (10 images pending)" in result.output

    resumed = StoreWriter.create_or_resume(url, spec)
    assert resumed.pending_shards() == [1, 2, 3] and "3 of 4 shards" in resumed.resume_summary
    for k in resumed.pending_shards():
        resumed.write_shard(k, shard_results(resumed, spec, k))
    resumed.finalize()
    assert verify_store(url).ok
    cache = TeacherCache(url)
    for i in range(14):
        assert np.array_equal(cache.get_codes(spec.image_ids[i]), make_result(spec, i).views["orig"].cls_codes)


def test_overwrite_on_s3_replaces_stores_and_refuses_foreign_prefixes(new_bucket):
    spec = make_spec()
    url = f"s3://{new_bucket}/c.zarr"
    _finished(url, spec)
    fresh = StoreWriter.create_or_resume(url, make_spec(teacher_sha="cd" * 32), overwrite=True)
    assert fresh.pending_shards() == [0, 1, 2] and not fresh.is_complete
    s3_client().put_object(Bucket=new_bucket, Key="photos/holiday.jpg", Body=b"x")
    with pytest.raises(NotAStoreError, match="refusing to delete"):
        StoreWriter.create_or_resume(f"s3://{new_bucket}/photos", spec, overwrite=True)
    assert s3_client().get_object(Bucket=new_bucket, Key="photos/holiday.jpg")["Body"].read() == b"x"


def _digest_all(cache: TeacherCache, image_ids, shard_order) -> str:
    """sha256 over every record (compact targets, detections, dense logits) of ``image_ids``."""
    if shard_order:
        cache.set_shard_order(*shard_order)
    h = hashlib.sha256()
    for image_id in image_ids:
        for view in cache.views:
            rec = cache.get(image_id, view)
            c = cache.get_compact(image_id, view)
            for t in (rec.cls_logits, rec.box_regression, rec.det_boxes, rec.det_scores, rec.det_labels, c.deltas,
                      c.codes):
                h.update(t.numpy().tobytes())
    return h.hexdigest()


def _reader_process(cache_bytes, image_ids, shard_order, queue):
    queue.put(_digest_all(pickle.loads(cache_bytes), image_ids, shard_order))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_four_reader_processes_at_once_read_what_one_reads(where, new_bucket, tmp_path):
    spec = make_spec(n=16, images_per_shard=3)
    url = str(tmp_path / "c.zarr") if where == "local" else f"s3://{new_bucket}/c.zarr"
    _finished(url, spec)
    cache = TeacherCache(url)
    ids = cache.ok_image_ids()
    single = _digest_all(cache, ids, None)
    # each process gets the pickled cache (what a spawned DataLoader worker receives) and opens its own store
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    orders = [None, None, ([5, 4, 3, 2, 1, 0], 2), ([0, 1, 2, 3, 4, 5], 1)]  # range reads and read-ahead
    procs = [ctx.Process(target=_reader_process, args=(pickle.dumps(cache), ids, orders[r], queue))
             for r in range(4)]
    for p in procs:
        p.start()
    digests = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert digests == [single] * 4


def test_read_ahead_in_sampler_order_keeps_at_most_2w_plus_1_shards(tmp_path):
    from sadpipe.shard_sampler import ShardAwareSampler

    spec = make_spec(n=24, images_per_shard=3, views=("orig",))  # 8 shards
    _finished(tmp_path / "c.zarr", spec, failed=set())
    plain, ahead = TeacherCache(tmp_path / "c.zarr"), TeacherCache(tmp_path / "c.zarr")
    sampler = ShardAwareSampler([i // 3 for i in range(24)], window=2, seed=4, cache=ahead)
    sampler.set_epoch(0)
    most = 0
    for i in sampler:
        a, b = ahead.get_compact(spec.image_ids[i]), plain.get_compact(spec.image_ids[i])
        assert torch.equal(a.deltas, b.deltas) and torch.equal(a.codes, b.codes)
        most = max(most, len(ahead._readers["views/orig/targets"]._shards))
    assert 2 <= most <= 5  # whole shards were used, never more than 2 * window + 1 held


def test_missing_credentials_is_one_line_naming_the_fix(new_bucket, tmp_path):
    import os
    import subprocess
    import sys

    spec = make_spec(n=4, images_per_shard=4)
    url = f"s3://{new_bucket}/c.zarr"
    _finished(url, spec)
    # the same server and store, a process without credentials (a fresh process: s3fs caches
    # filesystems, and botocore their credentials, per process)
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                             "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(AWS_EC2_METADATA_DISABLED="true")  # no instance-role lookup on 169.254.169.254
    run = subprocess.run([sys.executable, "-m", "sadpipe", "cache", "info", url], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert lines[0].startswith("error: no usable credentials") and "AWS_ACCESS_KEY_ID" in lines[0]
    # with the credentials back the same command reads the store
    ok = subprocess.run([sys.executable, "-m", "sadpipe", "cache", "info", url], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
