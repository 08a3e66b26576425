"""The dump-teacher driver against the teacher run directly, image by image.

The dataset is written here: images of three shapes (128x128, 100x150, 200x90) that, with
max_size=256, pad to three different canvases (128x128, 128x256, 256x128) inside one store
shard, plus one truncated file. The teacher is a tiny untrained detector whose
classification layer is re-drawn with a large spread so that its logits fill many codec bins
and produce detections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_spread_teacher

from sadpipe.cache.codec import codec_from_dict
from sadpipe.cache.format import StoreMismatchError
from sadpipe.cache.store_report import store_info, verify_store
from sadpipe.cache.reader import FailedImageError, TeacherCache
from sadpipe.config import load_config
from sadpipe.settings import load_settings, settings_from_dict
from sadpipe.data.images import ImageReadError, read_image
from sadpipe.tasks.dump import DumpError, dump_teacher
from sadpipe.labeling import postprocess
from sadpipe.models import load_detector

# (height, width) of the train images, then of the unlabeled ones; the last unlabeled file is truncated.
TRAIN_SIZES = [(128, 128), (100, 150), (200, 90), (100, 150), (128, 128), (200, 90)]
UNLABELED_SIZES = [(200, 90), (128, 128), (100, 150)]
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
CORRUPT_ID = 103


def _write_image(path: Path, hw: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = (rng.random((*hw, 3)) * 60).astype(np.uint8)
    y, x = hw[0] // 4, hw[1] // 4
    img[y : 3 * y, x : 3 * x] = rng.integers(120, 255, size=3, dtype=np.uint8)
    Image.fromarray(img).save(path, quality=95)


def make_dataset(root: Path) -> None:
    """train: 6 JPEGs with one box each; unlabeled: 3 JPEGs (ids 101..103), the last truncated."""
    (root / "train/images").mkdir(parents=True)
    (root / "unlabeled/images").mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(TRAIN_SIZES):
        name = f"{i + 1:03d}.jpg"
        _write_image(root / "train/images" / name, (h, w), i)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": CATEGORIES[i % 3]["id"], "iscrowd": 0,
                     "bbox": [w / 4, h / 4, w / 2, h / 2], "area": w * h / 4})
    (root / "train/annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                             "categories": CATEGORIES}))
    info = []
    for j, (h, w) in enumerate(UNLABELED_SIZES):
        name = f"{101 + j}.jpg"
        _write_image(root / "unlabeled/images" / name, (h, w), 100 + j)
        info.append({"id": 101 + j, "file_name": name, "height": h, "width": w})
    corrupt = root / "unlabeled/images" / f"{CORRUPT_ID}.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    (root / "unlabeled/image_info.json").write_text(json.dumps({"images": info}))


def overrides(root: Path) -> list[str]:
    return [
        f"data.root={json.dumps(str(root))}", 'data.val_images=""', 'data.val_annotations=""',
        "geometry.max_size=256",
        'teacher.model.arch="tiny"', "teacher.model.fpn_channels=32", "teacher.model.tiny_widths=[16,32,64,128]",
        'dump.views=["orig", "hflip"]', "dump.images_per_shard=4", "dump.batch_size=3", "dump.num_workers=0",
    ]


make_teacher = make_spread_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Dataset, config, teacher and one clean single-process dump, shared by the tests below."""
    base = tmp_path_factory.mktemp("dump")
    make_dataset(base / "data")
    cfg = load_settings(REPO / "pipelines" / "toy.toml", overrides(base / "data"))
    teacher = make_teacher(cfg, base / "teacher.pt")
    store = base / "clean.zarr"
    summary = dump_teacher(cfg, teacher, store, device="cpu", log=lambda *a: None)
    return {"base": base, "cfg": cfg, "teacher": teacher, "store": store, "summary": summary}


@torch.no_grad()
def direct(teacher, cfg, path: str, flip: bool):
    """The teacher on one image padded alone: (cls [A, K], bbox [A, 4], resized hw, padded hw)."""
    preprocess = cfg.geometry.preprocess
    image = read_image(path)
    if flip:
        image = image[:, ::-1].copy()
    size, padded = preprocess.sizes(*image.shape[:2])
    x = preprocess(image)
    batch = torch.zeros((1, 3, *padded))
    batch[0, :, : x.shape[1], : x.shape[2]] = x
    cls, bbox = teacher(batch)
    return cls[0], bbox[0], size, padded


def _code_mismatch(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).mean())


def test_records_equal_the_teacher_on_each_image_padded_alone(world):
    cfg, cache = world["cfg"], TeacherCache(world["store"])
    teacher = load_detector(world["teacher"]).eval()
    codec = cache.codec
    lo, hi = (torch.from_numpy(b) for b in codec.bin_bounds_q())
    layout = cfg.geometry.layout
    seen_padded = set()
    for image_id in cache.ok_image_ids():
        i = cache.index_of(image_id)
        path = cache.image_file(image_id)  # the stored path is relative to the dump's data root
        for view in ("orig", "hflip"):
            rec = cache.get(image_id, view)
            cls, bbox, size, padded = direct(teacher, cfg, path, flip=view == "hflip")
            seen_padded.add(padded)
            codes = cache.get_codes(image_id, view)
            expected_codes = codec.encode(cls).numpy()
            # batch vs alone may differ in the last float bits; a code may flip only at a bin edge
            assert codes.shape == expected_codes.shape == (cls.shape[0], 3)
            assert _code_mismatch(codes, expected_codes) <= 1e-3, (image_id, view)
            differ = codes != expected_codes
            assert (np.abs(codes.astype(int) - expected_codes.astype(int))[differ] <= 1).all()
            same = torch.from_numpy(~differ)
            assert torch.equal(rec.cls_logits[same], codec.decode(expected_codes)[same])
            # sigmoid of the decoded logit and of the exact one lie in the same bin [lo, hi]
            q_rec, q_dir = torch.sigmoid(rec.cls_logits.double()), torch.sigmoid(cls.double())
            c = torch.from_numpy(codes.astype(np.int64))
            width = (hi[c] - lo[c])[same]
            assert ((q_rec - q_dir).abs()[same] <= width + 1e-7).all()
            assert codes.max() > codes.min() + 5, "the test teacher should fill several bins"
            # detections: labeling.postprocess on the direct outputs, anchors of the image padded alone
            dets = postprocess(cls[None], bbox[None], layout.anchors(padded), [size], layout.anchors_per_level(padded),
                               score_thresh=cfg.detect.score_thresh, nms_thresh=cfg.detect.nms_thresh,
                               detections_per_img=cfg.detect.detections_per_img,
                               topk_candidates=cfg.detect.topk_candidates)[0]
            assert len(dets["scores"]) > 0
            assert torch.equal(rec.det_labels, dets["labels"])
            torch.testing.assert_close(rec.det_scores, dets["scores"], atol=1e-5, rtol=0)
            torch.testing.assert_close(rec.det_boxes, dets["boxes"], atol=1e-3, rtol=0)
            assert rec.resized_size == size and rec.padded_size == padded
        del i
    assert seen_padded == {(128, 128), (128, 256), (256, 128)}


def test_geometry_fields_by_hand(world):
    cache = TeacherCache(world["store"])
    # 100x150 (h x w): scale min(128/100, 256/150) = 1.28 -> 128 x 192 (floor), padded 128 x 256;
    # grids at strides 8..128: 16x32, 8x16, 4x8, 2x4, 1x2 -> 9 * (512+128+32+8+2) = 6138 anchors.
    rec = cache.get(2)
    assert rec.orig_size == (100, 150) and rec.resized_size == (128, 192) and rec.padded_size == (128, 256)
    assert rec.grid_sizes == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)] and rec.num_anchors == 6138
    # 200x90: scale min(128/90, 256/200) = 1.28 -> 256 x 115 (115.2 floored), padded 256 x 128
    rec = cache.get(3)
    assert rec.orig_size == (200, 90) and rec.resized_size == (256, 115) and rec.padded_size == (256, 128)
    assert rec.grid_sizes == [(32, 16), (16, 8), (8, 4), (4, 2), (2, 1)] and rec.num_anchors == 6138
    # 128x128: scale 1 -> 128 x 128, grids 16,8,4,2,1 squared -> 9 * 341 = 3069 anchors
    rec = cache.get(1)
    assert rec.resized_size == rec.padded_size == (128, 128) and rec.num_anchors == 3069
    # store shard 0 (plan positions 0..3 = ids 1..4) holds three canvas sizes
    assert {cache.get(i).padded_size for i in (1, 2, 3, 4)} == {(128, 128), (128, 256), (256, 128)}


def test_failed_image_is_recorded_and_skipped(world):
    cache = TeacherCache(world["store"])
    assert set(cache.failed_images) == {CORRUPT_ID}
    assert f"{CORRUPT_ID}.jpg" in cache.failed_images[CORRUPT_ID]
    assert CORRUPT_ID not in cache.ok_image_ids() and len(cache.ok_image_ids()) == 8
    assert cache.ok_image_ids("unlabeled") == [101, 102]
    with pytest.raises(FailedImageError, match=f"{CORRUPT_ID}.jpg"):
        cache.get(CORRUPT_ID)
    info = store_info(world["store"])
    assert (info["ok"], info["failed"]) == (8, 1)
    assert info["splits"]["unlabeled"] == {"images": 3, "ok": 2, "failed": 1, "pending": 0}
    assert world["summary"]["failed"] == 1
    assert verify_store(world["store"]).ok


def test_strict_stops_at_the_unreadable_file(world, tmp_path):
    with pytest.raises(ImageReadError, match=f"{CORRUPT_ID}.jpg"):
        dump_teacher(world["cfg"], world["teacher"], tmp_path / "strict.zarr", device="cpu", strict=True,
                     log=lambda *a: None)


def _all_records(store: Path) -> dict:
    cache = TeacherCache(store)
    out = {}
    for image_id in cache.ok_image_ids():
        for view in cache.views:
            rec = cache.get(image_id, view)
            out[image_id, view] = (cache.get_codes(image_id, view), rec.det_boxes.numpy(), rec.det_scores.numpy(),
                                   rec.det_labels.numpy(), rec.padded_size)
    return out


def assert_same_records(a: Path, b: Path) -> None:
    ra, rb = _all_records(a), _all_records(b)
    assert ra.keys() == rb.keys() and ra
    for key in ra:
        for x, y in zip(ra[key], rb[key]):
            assert np.array_equal(np.asarray(x), np.asarray(y)), key


def test_resume_after_a_crash_rewrites_only_unfinished_shards(world, tmp_path):
    store = tmp_path / "resumed.zarr"
    written = []

    def crash_after_two(k):  # called once shard k is written: the run stops before shard 2
        written.append(k)
        if len(written) == 2:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        dump_teacher(world["cfg"], world["teacher"], store, device="cpu", log=lambda *a: None,
                     on_shard_written=crash_after_two)
    assert written == [0, 1]
    status_files = {k: store / f"images/status/c/{k}" for k in (0, 1)}
    mtimes = {k: p.stat().st_mtime_ns for k, p in status_files.items()}

    rewritten = []
    # a run-only setting (workers) may change on resume
    cfg = load_settings(REPO / "pipelines" / "toy.toml", overrides(world["base"] / "data") + ["dump.num_workers=1"])
    summary = dump_teacher(cfg, world["teacher"], store, device="cpu", log=lambda *a: None,
                           on_shard_written=rewritten.append)
    assert rewritten == [2]  # 9 images in shards of 4: shard 2 is the only unfinished one
    assert summary["images"] == 1 and summary["fit_seconds"] == 0.0  # the stored codec is reused
    assert {k: p.stat().st_mtime_ns for k, p in status_files.items()} == mtimes
    assert verify_store(store).ok
    assert_same_records(store, world["store"])
    assert TeacherCache(store).metadata["codec"] == TeacherCache(world["store"]).metadata["codec"]


def test_existing_store_of_another_teacher_or_config_is_refused(world, tmp_path):
    cfg = world["cfg"]
    store = tmp_path / "other.zarr"
    dump_teacher(cfg, world["teacher"], store, device="cpu", limit=4, log=lambda *a: None)
    other = make_teacher(cfg, tmp_path / "other_teacher.pt", seed=1)
    with pytest.raises(StoreMismatchError, match="checkpoint_sha256"):
        dump_teacher(cfg, other, store, device="cpu", limit=4, log=lambda *a: None)
    changed = load_settings(REPO / "pipelines" / "toy.toml",
                          overrides(world["base"] / "data") + ["detect.score_thresh=0.2"])
    with pytest.raises(StoreMismatchError, match="score_thresh"):
        dump_teacher(changed, world["teacher"], store, device="cpu", limit=4, log=lambda *a: None)
    with pytest.raises(StoreMismatchError, match="plan"):  # another plan (limit) is another store
        dump_teacher(cfg, world["teacher"], store, device="cpu", limit=5, log=lambda *a: None)
    # student settings do not touch the teacher cache: same store, nothing to do
    student = load_settings(REPO / "pipelines" / "toy.toml",
                          overrides(world["base"] / "data") + ["student.train.lr=0.5"])
    assert dump_teacher(student, world["teacher"], store, device="cpu", limit=4, log=lambda *a: None)["images"] == 0
    summary = dump_teacher(cfg, other, store, device="cpu", limit=4, overwrite=True, log=lambda *a: None)
    assert summary["images"] == 4
    meta = TeacherCache(store).metadata
    assert meta["teacher"]["checkpoint"] == str(other.resolve()) and meta["plan_limit"] == 4


def test_teacher_with_another_layout_or_classes_is_refused(world, tmp_path):
    data = world["base"] / "data"
    other_anchors = load_settings(REPO / "pipelines" / "toy.toml", overrides(data) + ["geometry.anchor_sizes=[32,64,128,256,512]"])
    path = make_teacher(other_anchors, tmp_path / "anchors.pt")
    with pytest.raises(DumpError, match="anchor layout"):
        dump_teacher(world["cfg"], path, tmp_path / "a.zarr", device="cpu", log=lambda *a: None)

    other_classes = dict(json.loads((data / "train/annotations.json").read_text()))
    other_classes["categories"] = CATEGORIES + [{"id": 9, "name": "d"}]
    (tmp_path / "ann.json").write_text(json.dumps(other_classes))
    cfg4 = load_settings(REPO / "pipelines" / "toy.toml", overrides(data) + [f"data.train_annotations={json.dumps(str(tmp_path / 'ann.json'))}"])
    path = make_teacher(cfg4, tmp_path / "classes.pt")
    with pytest.raises(DumpError, match="category ids"):
        dump_teacher(world["cfg"], path, tmp_path / "b.zarr", device="cpu", log=lambda *a: None)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_two_processes_write_the_same_store_as_one(world, tmp_path):
    store = tmp_path / "two.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sadpipe",
           "dump-teacher", "--config", str(REPO / "pipelines" / "toy.toml"), "--teacher", str(world["teacher"]),
           "--out", str(store), "--device", "cpu"]
    for o in overrides(world["base"] / "data"):
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0:" in run.stdout and "rank 1:" in run.stdout
    assert verify_store(store).ok
    assert_same_records(store, world["store"])


def test_default_codec_is_refitted_on_this_teacher_and_a_given_fit_is_kept(world, tmp_path):
    from sadpipe.cache.codec import default_codec

    stored = TeacherCache(world["store"]).codec
    shipped = default_codec()
    # same bins, decode values fitted on this teacher: each decoded q stays inside its bin,
    # and the values differ from the ones shipped for the toy teacher
    assert (stored.floor, stored.step, stored.log_ratio, stored.log_until) == \
        (shipped.floor, shipped.step, shipped.log_ratio, shipped.log_until)
    assert stored.decode_q != shipped.decode_q
    lo, hi = stored.bin_bounds_q()
    q = np.asarray(stored.decode_q)
    assert ((q >= lo) & (q <= hi)).all()
    # the background bin's decoded value is the power mean of this teacher's q below the floor
    teacher = load_detector(world["teacher"]).eval()
    cls = direct(teacher, world["cfg"], str(world["base"] / "data/train/images/001.jpg"), flip=False)[0]
    below = torch.sigmoid(cls.double())[torch.sigmoid(cls.double()) < stored.floor]
    assert abs(stored.decode_q[0] - float((below ** 1.8).mean() ** (1 / 1.8))) < 0.2 * stored.decode_q[0]

    given = shipped.to_dict()
    raw = load_config(REPO / "pipelines" / "toy.toml", overrides(world["base"] / "data"))
    raw["dump"]["codec"] = given
    cfg = settings_from_dict(raw)
    summary = dump_teacher(cfg, world["teacher"], tmp_path / "given.zarr", device="cpu", limit=4, log=lambda *a: None)
    assert summary["fit_seconds"] == 0.0
    assert TeacherCache(tmp_path / "given.zarr").codec == codec_from_dict(given)


_SLOW_DUMP_DRIVER = """
# the dump-teacher command's arguments, run by dump_teacher with a hook that pauses after each shard
# is written, so the test can SIGKILL it mid-dump
import argparse, sys, time
from sadpipe.settings import load_settings
from sadpipe.tasks.dump import dump_teacher
ap = argparse.ArgumentParser()
for option in ("--config", "--teacher", "--out", "--device"):
    ap.add_argument(option)
ap.add_argument("--set", action="append", default=[])
args = ap.parse_args(sys.argv[2:])
dump_teacher(load_settings(args.config, args.set), args.teacher, args.out, device=args.device,
             on_shard_written=lambda k: time.sleep(1.0))
"""


def test_sigkill_mid_dump_then_the_same_command_completes(world, tmp_path):
    """SIGKILL once shard 0 is on disk, then rerun the same command: complete, verified, equal to a clean dump."""
    import signal
    import time

    store = tmp_path / "killed.zarr"
    driver = tmp_path / "driver.py"
    driver.write_text(_SLOW_DUMP_DRIVER)
    args = ["dump-teacher", "--config", str(REPO / "pipelines" / "toy.toml"), "--teacher", str(world["teacher"]),
            "--out", str(store), "--device", "cpu"]
    for o in overrides(world["base"] / "data"):
        args += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(driver), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (store / "images/status/c/0").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "shard 0 never appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the store is incomplete now: the reader must refuse it
    with pytest.raises(Exception, match="not finished|incomplete|resume"):
        TeacherCache(store).image_ids
    rerun = subprocess.run([sys.executable, "-m", "sadpipe", *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    assert verify_store(store).ok
    assert_same_records(store, world["store"])
