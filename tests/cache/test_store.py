"""Writer: write/read round trip, resume after a crash, mismatch refusal, overwrite, disk
errors, and two concurrent writers producing the same store as one."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sadpipe.cache.codec import codec_from_dict
from sadpipe.cache.format import (
    IncompleteStoreError,
    NotAStoreError,
    StoreMismatchError,
    StoreWriteError,
)
from sadpipe.cache.store_report import verify_store
from sadpipe.cache.reader import FailedImageError, TeacherCache
from sadpipe.cache.writer import StoreWriter

from . import make_result, make_spec, shard_results, write_all


def test_round_trip_by_id_after_shuffled_shard_order(tmp_path):
    spec = make_spec(n=10, images_per_shard=4)  # 3 shards, the last one short (2 images)
    failed = {3, 9}
    writer = StoreWriter.create_or_resume(tmp_path / "c.zarr", spec)
    write_all(writer, spec, failed, order=[2, 0, 1])
    writer.finalize()

    cache = TeacherCache(tmp_path / "c.zarr")
    codec = codec_from_dict(spec.metadata["codec"])
    assert len(cache) == 10 and cache.image_ids == spec.image_ids
    assert cache.views == ("orig", "hflip")
    # make_spec: first 6 plan positions are labeled
    assert cache.splits == {"labeled": spec.image_ids[:6], "unlabeled": spec.image_ids[6:]}
    assert cache.ok_image_ids() == [x for i, x in enumerate(spec.image_ids) if i not in failed]
    rng = np.random.default_rng(0)
    for i in rng.permutation(10):  # join by id in an order unrelated to the write order
        image_id = spec.image_ids[i]
        expected = make_result(spec, int(i), failed)
        if i in failed:
            with pytest.raises(FailedImageError, match="cannot identify image file"):
                cache[image_id]
            continue
        for view in spec.views:
            rec = cache.get(image_id, view=view)
            ev = expected.views[view]
            assert rec.image_id == image_id and rec.view == view and rec.status == "ok"
            assert rec.split == ("labeled" if i < 6 else "unlabeled")
            assert rec.path == f"/data/img_{image_id}.jpg"
            assert rec.cls_logits.dtype == torch.float32
            assert torch.equal(rec.cls_logits, codec.decode(ev.cls_codes).float())
            assert np.array_equal(cache.get_codes(image_id, view), ev.cls_codes)
            assert torch.equal(rec.box_regression, torch.from_numpy(ev.box_regression.astype(np.float32)))
            assert torch.equal(rec.det_boxes, torch.from_numpy(ev.det_boxes))
            assert torch.equal(rec.det_scores, torch.from_numpy(ev.det_scores))
            assert rec.det_labels.tolist() == ev.det_labels.tolist()
            assert rec.orig_size == expected.orig_hw and rec.resized_size == expected.resized_hw
            assert rec.padded_size == expected.padded_hw
            assert rec.grid_sizes == [tuple(g) for g in expected.grid_hw.tolist()]
    assert cache.completion["by_status"] == {"ok": 8, "failed": 2}
    # failed 3 is labeled (< 6), failed 9 is unlabeled
    assert cache.completion["by_split"]["labeled"] == {"images": 6, "ok": 5, "failed": 1}
    assert cache.completion["by_split"]["unlabeled"] == {"images": 4, "ok": 3, "failed": 1}


def test_plain_zarr_reads_the_store_and_padding_is_zero(tmp_path):
    spec = make_spec(n=5, images_per_shard=2, views=("orig",), box_regression=False)
    writer = StoreWriter.create_or_resume(tmp_path / "c.zarr", spec)
    write_all(writer, spec)
    writer.finalize()
    root = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert "box_regression" not in root["views/orig"]
    blobs = root["views/orig/targets"][:]
    encoding, entries = root["index/views/orig/encoding"][:], root["index/views/orig/num_entries"][:]
    for i in range(5):
        r = make_result(spec, i)
        codes = r.views["orig"].cls_codes.reshape(-1)
        raw = np.frombuffer(blobs[i], np.uint8)
        if encoding[i] == 1:  # dense: the codes themselves
            assert np.array_equal(raw, codes)
        else:  # sparse: low bytes of the gaps, high bytes, codes; unpacked here by hand
            m = entries[i]
            gaps = raw[:m].astype(np.int64) + 256 * raw[m : 2 * m].astype(np.int64)
            positions = np.cumsum(gaps) - 1
            rebuilt = np.zeros_like(codes)
            rebuilt[positions] = raw[2 * m :]
            assert np.array_equal(rebuilt, codes) and (raw[2 * m :] > 0).all()  # no fillers at this size
    assert root["images/image_id"][:].tolist() == spec.image_ids
    assert root.attrs["sadpipe"]["teacher"]["checkpoint_sha256"] == "ab" * 32


class _CrashOnWrite:
    """Stands in for the status array: the process 'dies' before the status is written."""

    def __setitem__(self, key, value):
        raise RuntimeError("simulated crash")


def test_resume_after_crash_rewrites_only_unfinished_shards(tmp_path):
    path = tmp_path / "c.zarr"
    spec = make_spec(n=14, images_per_shard=4)  # shards 0..3
    writer = StoreWriter.create_or_resume(path, spec)
    writer.write_shard(0, shard_results(writer, spec, 0))
    writer.write_shard(2, shard_results(writer, spec, 2))
    writer._arrays["images/status"] = _CrashOnWrite()
    with pytest.raises(RuntimeError, match="simulated crash"):
        writer.write_shard(1, shard_results(writer, spec, 1))  # every array but status written
    del writer
    # shard 1's teacher targets are on disk, yet the shard must count as unfinished
    assert (path / "views/orig/targets/c/1").exists()

    resumed = StoreWriter.create_or_resume(path, spec)
    assert resumed.pending_shards() == [1, 3]
    assert resumed.pending_shards(rank=1, world_size=2) == [1, 3]
    assert resumed.pending_shards(rank=0, world_size=2) == []
    assert "2 of 4 shards" in resumed.resume_summary
    with pytest.raises(IncompleteStoreError, match="2 of 4 shards"):
        resumed.finalize()
    with pytest.raises(IncompleteStoreError, match="dump not finished; rerun the same dump-teacher command"):
        TeacherCache(path)
    for k in resumed.pending_shards():
        resumed.write_shard(k, shard_results(resumed, spec, k))
    mark = resumed.finalize()
    assert mark == resumed.finalize()  # idempotent: same mark, same completed_at
    assert verify_store(path).ok

    again = StoreWriter.create_or_resume(path, spec)
    assert again.pending_shards() == [] and "already complete" in again.resume_summary
    cache = TeacherCache(path)
    for i in range(14):
        assert np.array_equal(cache.get_codes(spec.image_ids[i]), make_result(spec, i).views["orig"].cls_codes)


def test_mismatched_spec_is_refused_with_the_differing_keys(tmp_path):
    path = tmp_path / "c.zarr"
    StoreWriter.create_or_resume(path, make_spec())
    with pytest.raises(StoreMismatchError) as err:
        StoreWriter.create_or_resume(path, make_spec(teacher_sha="cd" * 32))
    msg = str(err.value)
    assert "teacher.checkpoint_sha256" in msg and "use --overwrite to replace it" in msg
    assert "plan_sha256" not in msg  # only the teacher differs
    other_plan = make_spec()
    other_plan.paths = list(reversed(other_plan.paths))
    with pytest.raises(StoreMismatchError, match="plan_sha256"):
        StoreWriter.create_or_resume(path, other_plan)
    with pytest.raises(StoreMismatchError, match="images_per_shard"):
        StoreWriter.create_or_resume(path, make_spec(images_per_shard=5))


def test_overwrite_recreates_and_refuses_foreign_directories(tmp_path):
    path = tmp_path / "c.zarr"
    spec = make_spec()
    writer = StoreWriter.create_or_resume(path, spec)
    write_all(writer, spec)
    writer.finalize()
    fresh = StoreWriter.create_or_resume(path, make_spec(teacher_sha="cd" * 32), overwrite=True)
    assert fresh.pending_shards() == [0, 1, 2] and not fresh.is_complete
    assert fresh.metadata["teacher"]["checkpoint_sha256"] == "cd" * 32

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(NotAStoreError, match="refusing to delete"):
        StoreWriter.create_or_resume(foreign, spec, overwrite=True)
    assert (foreign / "holiday.jpg").exists()


def test_write_shard_rejects_results_that_do_not_cover_the_shard(tmp_path):
    spec = make_spec(n=8, images_per_shard=4)
    writer = StoreWriter.create_or_resume(tmp_path / "c.zarr", spec)
    results = shard_results(writer, spec, 0)
    with pytest.raises(ValueError, match=r"missing \[3\]"):
        writer.write_shard(0, results[:3])
    with pytest.raises(ValueError, match="given twice"):
        writer.write_shard(0, results + results[:1])
    wrong_id = make_result(spec, 1)
    wrong_id.image_id = spec.image_ids[5]
    with pytest.raises(ValueError, match="the plan has image id"):
        writer.write_shard(0, [results[0], wrong_id, results[2], results[3]])
    assert writer.pending_shards() == [0, 1]  # nothing was written


def test_disk_full_becomes_a_resumable_store_write_error(tmp_path, monkeypatch):
    spec = make_spec(n=8, images_per_shard=4)
    writer = StoreWriter.create_or_resume(tmp_path / "c.zarr", spec)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("zarr.storage._local._put", no_space)
    with pytest.raises(StoreWriteError) as err:
        writer.write_shard(1, shard_results(writer, spec, 1))
    msg = str(err.value)
    assert "shard 1" in msg and "resumable" in msg and "No space left on device" in msg
    monkeypatch.undo()
    assert writer.pending_shards() == [0, 1]


def _write_rank(path: str, rank: int, world_size: int) -> None:
    spec = make_spec(n=13, images_per_shard=3)
    writer = StoreWriter.open(path)
    for k in writer.pending_shards(rank, world_size):
        writer.write_shard(k, shard_results(writer, spec, k, failed={4}))


def _store_files(path: Path) -> dict[str, bytes]:
    """Every file of the store except the root zarr.json (holds creation/completion times)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in path.rglob("*") if p.is_file() and p != path / "zarr.json"
    }


def test_two_writer_processes_make_the_same_store_as_one(tmp_path):
    spec = make_spec(n=13, images_per_shard=3)  # 5 shards: rank 0 writes 0, 2, 4; rank 1 writes 1, 3
    single = StoreWriter.create_or_resume(tmp_path / "one.zarr", spec)
    write_all(single, spec, failed={4})
    single.finalize()

    StoreWriter.create_or_resume(tmp_path / "two.zarr", spec)  # rank 0 creates, then "barrier"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_rank, args=(str(tmp_path / "two.zarr"), r, 2)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    StoreWriter.open(tmp_path / "two.zarr").finalize()

    one, two = _store_files(tmp_path / "one.zarr"), _store_files(tmp_path / "two.zarr")
    assert sorted(one) == sorted(two)
    assert [name for name in one if one[name] != two[name]] == []
    attrs = [json.loads((tmp_path / s / "zarr.json").read_text())["attributes"] for s in ("one.zarr", "two.zarr")]
    for a in attrs:
        del a["sadpipe"]["created_at"], a["sadpipe_completion"]["completed_at"]
    assert attrs[0] == attrs[1]
    assert verify_store(tmp_path / "two.zarr").ok


def test_completion_mark_is_the_last_write(tmp_path, monkeypatch):
    """finalize writes the consolidated index first and the root zarr.json (the mark) last."""
    spec = make_spec(n=6, images_per_shard=3)
    writer = StoreWriter.create_or_resume(tmp_path / "c.zarr", spec)
    write_all(writer, spec)
    written = []
    import zarr.storage._local as local

    real_put = local._put

    def spy(path, value, exclusive=False):
        written.append(Path(path).relative_to(tmp_path / "c.zarr").as_posix())
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", spy)
    writer.finalize()
    assert written[-1] == "zarr.json"
    assert any(w.startswith("index/images/status/") for w in written[:-1])
    assert json.loads((tmp_path / "c.zarr/zarr.json").read_text())["attributes"]["sadpipe_completion"]["complete"]
