"""verify_store catches corruption and inconsistencies; store_info reports sizes and counts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from sadpipe.cache import format as fmt
from sadpipe.cache.store_report import format_store_info, store_info, verify_store
from sadpipe.cache.writer import StoreWriter

from . import NUM_CLASSES, make_result, make_spec, shard_results, write_all


def _finished_store(path, n=10, images_per_shard=4, failed=frozenset({5})):
    spec = make_spec(n=n, images_per_shard=images_per_shard)
    writer = StoreWriter.create_or_resume(path, spec)
    write_all(writer, spec, failed)
    writer.finalize()
    return spec


def test_counts_by_split_counts_each_named_status():
    split = np.array([0, 0, 1, 1, 1], np.uint8)  # labeled, labeled, unlabeled x 3
    status = np.array([fmt.STATUS_OK, fmt.STATUS_FAILED, fmt.STATUS_PENDING, fmt.STATUS_OK, fmt.STATUS_OK], np.uint8)
    counts = fmt.counts_by_split(split, status, ("ok", "failed", "pending"))
    assert counts == {"labeled": {"images": 2, "ok": 1, "failed": 1, "pending": 0},
                      "unlabeled": {"images": 3, "ok": 2, "failed": 0, "pending": 1}}
    assert list(counts["unlabeled"]) == ["images", "ok", "failed", "pending"]  # the order asked for
    assert fmt.counts_by_split(split, status, ("failed",))["labeled"] == {"images": 2, "failed": 1}


def test_clean_store_verifies(tmp_path):
    _finished_store(tmp_path / "c.zarr")
    report = verify_store(tmp_path / "c.zarr")
    assert report.ok and report.problems == []
    assert "OK" in str(report)


@pytest.mark.parametrize("where", [0.0, 0.37, 0.81, 1.0])
def test_flipped_byte_in_a_targets_shard_is_reported(tmp_path, where):
    _finished_store(tmp_path / "c.zarr")
    shard_file = tmp_path / "c.zarr/views/hflip/targets/c/1"  # store shard 1, images 4..7
    raw = bytearray(shard_file.read_bytes())
    pos = min(len(raw) - 1, int(where * len(raw)))  # first byte, chunk data, shard index, last byte
    raw[pos] ^= 0x10
    shard_file.write_bytes(bytes(raw))
    report = verify_store(tmp_path / "c.zarr")
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith("views/hflip/targets shard 1 (images 4..7)")
    assert "checksum" in report.problems[0]


def test_incomplete_store_and_inconsistent_metadata_are_reported(tmp_path):
    spec = make_spec(n=10, images_per_shard=4)
    writer = StoreWriter.create_or_resume(tmp_path / "c.zarr", spec)
    writer.write_shard(1, shard_results(writer, spec, 1))
    problems = verify_store(tmp_path / "c.zarr").problems
    assert any("no completion mark" in p for p in problems)
    assert any("2 shard(s) not complete" in p and "[0, 2]" in p for p in problems)

    _finished_store(tmp_path / "d.zarr")
    root = zarr.open_group(tmp_path / "d.zarr", mode="r+")
    mark = dict(root.attrs["sadpipe_completion"])
    mark["by_status"] = {"ok": 10, "failed": 0}  # arrays say 9 ok, 1 failed
    root.attrs["sadpipe_completion"] = mark
    problems = verify_store(tmp_path / "d.zarr").problems
    assert problems == [
        "completion mark by_status = {'ok': 10, 'failed': 0} but the arrays give {'ok': 9, 'failed': 1}"
    ]


def test_deleted_shard_file_of_a_written_shard_is_caught(tmp_path):
    _finished_store(tmp_path / "c.zarr")
    os.remove(tmp_path / "c.zarr/images/status/c/2")  # shard 2 now reads as pending
    problems = verify_store(tmp_path / "c.zarr").problems
    assert any("1 shard(s) not complete" in p and "[2]" in p for p in problems)
    assert any("index/images/status: consolidated index differs" in p for p in problems)


def test_store_info_counts_and_compression(tmp_path):
    path = tmp_path / "c.zarr"
    spec = _finished_store(path, n=10, images_per_shard=4, failed={5})
    info = store_info(path)
    assert info["complete"] and info["num_images"] == 10 and info["num_shards"] == 3
    assert (info["ok"], info["failed"], info["pending"]) == (9, 1, 0)
    assert info["splits"]["labeled"] == {"images": 6, "ok": 5, "failed": 1, "pending": 0}
    assert info["failed_images"] == [
        {"image_id": spec.image_ids[5], "path": f"/data/img_{spec.image_ids[5]}.jpg",
         "reason": f"cannot identify image file for {spec.image_ids[5]}"}
    ]
    # independent count: values of ok images, bytes of the chunk files under targets/c
    values = sum(make_result(spec, i).num_anchors for i in range(10) if i != 5) * NUM_CLASSES
    for v in spec.views:
        stored = sum(p.stat().st_size for p in (path / f"views/{v}/targets/c").rglob("*") if p.is_file())
        assert info["views"][v]["targets_bytes"] == stored
        # make_result alternates weak (dense) and confident (sparse) images: even positions dense
        assert (info["views"][v]["dense_images"], info["views"][v]["sparse_images"]) == (5, 4)
        assert info["views"][v]["bits_per_value"] == pytest.approx(8 * stored / values)
        assert info["views"][v]["ratio_to_float32"] == pytest.approx(4 * values / stored)
    assert info["bytes_total"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert info["teacher"]["checkpoint_sha256"] == "ab" * 32
    text = format_store_info(info)
    assert "ok 9, failed 1, pending 0" in text and "cannot identify image file" in text
    assert "bits per value" in text


def test_records_that_do_not_fit_their_image_are_reported(tmp_path):
    _finished_store(tmp_path / "c.zarr", failed=frozenset({1}))
    arr = zarr.open_array(tmp_path / "c.zarr/views/orig/targets", mode="r+")
    block = arr[0:4]
    block[0] = block[0][:-1]  # image 0's record one byte short of what its entry count says
    block[1] = b"\x01\x00\x07"  # failed image 1 must have no record at all
    arr[0:4] = block  # a whole-shard rewrite: checksums stay valid
    problems = verify_store(tmp_path / "c.zarr").problems
    assert problems == ["views/orig/targets shard 0: records inconsistent with their image's anchors or entry "
                        "counts at plan positions [0, 1]"]
