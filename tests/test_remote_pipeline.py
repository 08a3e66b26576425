"""The toy pipeline against a teacher cache on S3 (moto's server on 127.0.0.1): a dump killed
mid-way and resumed, verified, then two student runs reading the store at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, make_spread_teacher, tiny_overrides
from s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401 (fixtures)

from sadpipe.cache.format import IncompleteStoreError
from sadpipe.cache.store_report import verify_store
from sadpipe.cache.reader import TeacherCache
from sadpipe.settings import load_settings
from sadpipe.tasks.dump import dump_teacher

TOY = REPO / "pipelines" / "toy.toml"
STUDENT = ["student.model.tiny_widths=[8,16,32,64]", "student.model.fpn_channels=16", "student.train.batch_size=4"]

_SLOW_DUMP_DRIVER = """
# `sadpipe dump-teacher` whose shard writes are slowed down, so the test can SIGKILL it mid-dump
import sys, time
from sadpipe.cache.writer import StoreWriter
from sadpipe.cli import main
original = StoreWriter.write_shard
def slow(self, k, results):
    time.sleep(1.0)
    original(self, k, results)
StoreWriter.write_shard = slow
main(sys.argv[1:])
"""


def _exists(bucket: str, key: str) -> bool:
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception:
        return False


def _sets(overrides) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _records(store) -> dict:
    cache = TeacherCache(store)
    out = {}
    for image_id in cache.ok_image_ids():
        c = cache.get_compact(image_id)
        boxes, scores, labels = cache.get_detections(image_id)
        out[image_id] = (c.deltas.numpy(), c.codes.numpy(), c.background, boxes.numpy(), scores.numpy(), labels.numpy())
    return out


@pytest.mark.slow
def test_dump_killed_and_resumed_on_s3_then_two_students_read_it_at_once(toy_root, new_bucket, tmp_path):
    overrides = tiny_overrides(toy_root) + STUDENT
    cfg = load_settings(TOY, overrides)
    teacher = make_spread_teacher(cfg, tmp_path / "teacher.pt")
    url = f"s3://{new_bucket}/caches/toy.zarr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    dump_args = ["dump-teacher", "--config", str(TOY), "--teacher", str(teacher), "--out", url, "--device", "cpu",
                 *_sets(overrides)]

    # -- dump, SIGKILL once shard 0 is in the bucket, then the same command resumes it
    driver = tmp_path / "driver.py"
    driver.write_text(_SLOW_DUMP_DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), *dump_args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not _exists(new_bucket, "caches/toy.zarr/images/status/c/0"):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "shard 0 never appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(IncompleteStoreError, match="dump not finished"):
        TeacherCache(url)
    rerun = subprocess.run([sys.executable, "-m", "sadpipe", *dump_args], env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and f"store complete: {url}" in rerun.stdout
    status = subprocess.run([sys.executable, "-m", "sadpipe", "cache", "verify", url], env=env, capture_output=True,
                            text=True, timeout=300)
    assert status.returncode == 0 and "OK" in status.stdout, status.stdout + status.stderr[-2000:]
    # the resolved config has no directory to sit in next to an S3 prefix: it is kept inside the store
    saved = s3_client().get_object(Bucket=new_bucket, Key="caches/toy.zarr/config.resolved.toml")["Body"].read()
    assert f'root = "{toy_root}"'.encode() in saved

    # -- the resumed S3 store holds what one clean local dump holds
    local = tmp_path / "local.zarr"
    dump_teacher(cfg, teacher, local, device="cpu", log=lambda *a: None)
    remote_records, local_records = _records(url), _records(local)
    assert remote_records.keys() == local_records.keys() and len(local_records) == 80
    for image_id, fields in local_records.items():
        for a, b in zip(remote_records[image_id], fields):
            assert np.array_equal(np.asarray(a), np.asarray(b)), image_id

    # -- two students at once from S3 (worker processes; one samples shard by shard with read-ahead),
    #    then the first one's twin from the local store: same data, so bit-identical weights
    def student(cache, out, *extra):
        return [sys.executable, "-m", "sadpipe", "train-student", "--config", str(TOY), "--cache", str(cache),
                "--out", str(out), "--device", "cpu", "--method", "sad", "--max-steps", "3",
                *_sets(overrides + list(extra))]

    runs = {"s3": student(url, tmp_path / "s3", "student.train.num_workers=2"),
            "s3_shards": student(url, tmp_path / "s3_shards", "student.train.num_workers=2", "distill.shard_window=2")}
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in runs.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"{name}: {err[-3000:]}"
    twin = subprocess.run(student(local, tmp_path / "local"), env=env, capture_output=True, text=True, timeout=900)
    assert twin.returncode == 0, twin.stderr[-3000:]
    final = {name: torch.load(tmp_path / name / "final.pt", map_location="cpu", weights_only=True)["model"]
             for name in ("s3", "s3_shards", "local")}
    for key, value in final["local"].items():
        assert torch.equal(value, final["s3"][key]), key
    for name in ("s3", "s3_shards"):
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if line]
        assert len(metrics) == 3 and all(np.isfinite(m["distill"]) and m["distill"] > 0 for m in metrics), metrics
    # shard-local order is another order: its weights differ from the random-order run's
    assert any(not torch.equal(v, final["s3_shards"][k]) for k, v in final["s3"].items())
