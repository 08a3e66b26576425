"""The shipped COCO pipelines, unchanged, at their real geometry (600/1000, 80 classes) on CPU, through the CLI.

Only data.root, step counts and backbone weights are overridden: a COCO-like synthetic set, 2
optimizer steps, stand-in ResNet weights (real ImageNet weights cannot be downloaded here). The
documented run with 8 + 8 images and its measured times are in docs/results.md; this test uses
fewer images to stay at a few minutes.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from conftest import REPO

from sadpipe.backbone_weights import save_standin_backbone_weights
from sadpipe.cache.reader import TeacherCache
from sadpipe.cli import main
from sadpipe.data.coco_like import make_coco_like_dataset

TEACHER_TOML = str(REPO / "pipelines" / "coco_r101_teacher.toml")
STUDENT_TOML = str(REPO / "pipelines" / "coco_sad_r50.toml")


def _anchors(height: int, width: int) -> int:
    """Anchors of one image at the pipelines' geometry, by hand: shorter side 600, longer <= 1000, padded to 128,
    levels P3..P7 (strides 8..128), 9 anchors per cell."""
    scale = min(600 / min(height, width), 1000 / max(height, width))
    h, w = math.floor(height * scale), math.floor(width * scale)
    ph, pw = math.ceil(h / 128) * 128, math.ceil(w / 128) * 128
    return sum((ph // s) * (pw // s) * 9 for s in (8, 16, 32, 64, 128))


_OPENED: list | None = None  # while a files_opened() block runs: (path, mode) of each file opened


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None:
        _OPENED.append((args[0], args[1]))


sys.addaudithook(_record_open)  # audit hooks cannot be removed; it records only inside files_opened()


@contextmanager
def files_opened():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_coco_pipelines_teacher_dump_student_evaluate(tmp_path):
    root = tmp_path / "coco"
    make_coco_like_dataset(root, n_train=2, n_val=1, n_unlabeled=2, workers=1)
    r101 = save_standin_backbone_weights("resnet101", tmp_path / "resnet101.pth", batches=1)
    r50 = save_standin_backbone_weights("resnet50", tmp_path / "resnet50.pth", batches=1)
    data = ["--set", f"data.root={json.dumps(str(root))}"]

    # 1. the ResNet-101 teacher, 2 steps (frozen BN with the stand-in weights: a finite loss)
    teacher_dir = tmp_path / "r101"
    _invoke(["train-teacher", "--config", TEACHER_TOML, *data, "--set",
             f"teacher.model.backbone_weights={json.dumps(str(r101))}", "--max-steps", "2", "--device", "cpu",
             "--out", str(teacher_dir)])
    records = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (teacher_dir / "final.pt").is_file()

    # 2. the dump, driven by the student pipeline's data/dump sections: train + unlabeled, views orig and hflip
    cache = tmp_path / "r101.zarr"
    _invoke(["dump-teacher", "--config", STUDENT_TOML, *data, "--teacher", str(teacher_dir / "final.pt"),
             "--device", "cpu", "--out", str(cache)])
    _invoke(["cache", "verify", str(cache)])
    info = json.loads(_invoke(["cache", "info", str(cache), "--json"]).stdout)
    assert info["complete"] and info["ok"] == 4 and info["failed"] == 0
    assert info["splits"]["labeled"]["ok"] == 2 and info["splits"]["unlabeled"]["ok"] == 2
    assert set(info["views"]) == {"orig", "hflip"} and info["num_classes"] == 80
    # the real geometry: every image of the set (640x480, 480x640, 500x375) has 107,415 anchors x 80 classes
    assert _anchors(480, 640) == _anchors(640, 480) == _anchors(375, 500) == 107_415
    store = TeacherCache(cache)
    for image_id in (1, 2, 200_001, 200_002):
        for view in ("orig", "hflip"):
            logits = store.get(image_id, view=view, box_regression=False, detections=False).cls_logits
            assert tuple(logits.shape) == (107_415, 80) and bool(logits.isfinite().all())

    # 3. the ResNet-50 student from the cache (SAD with pseudo-labels); the teacher is never loaded
    student_dir = tmp_path / "r50_sad"
    with files_opened() as opened:  # Python's audit events: every file the process opens
        result = _invoke(["train-student", "--config", STUDENT_TOML, *data, "--cache", str(cache), "--set",
                          f"student.model.backbone_weights={json.dumps(str(r50))}", "--max-steps", "2",
                          "--device", "cpu", "--out", str(student_dir)])
    read_checkpoints = [p for p, mode in opened if str(p).endswith(".pt") and "r" in str(mode)]
    assert not read_checkpoints, f"train-student read a checkpoint: the teacher must come from the cache only"
    assert any(str(p).startswith(str(cache)) for p, _ in opened)  # the spy works: it saw the cache's reads
    assert "student sad (resnet50)" in result.stdout
    assert (student_dir / "final.pt").is_file()

    # 4. evaluate the student checkpoint on val2017
    metrics_path = tmp_path / "student_eval.json"
    _invoke(["evaluate", "--config", STUDENT_TOML, *data, "--checkpoint", str(student_dir / "final.pt"),
             "--device", "cpu", "--out", str(metrics_path)])
    metrics = json.loads(metrics_path.read_text())["metrics"]
    assert {"AP", "AP50"} <= set(metrics) and all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50"))
