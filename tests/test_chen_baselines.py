"""Chen et al.'s teacher-bounded regression loss inside a student's batch (sadpipe.tasks.distill).

The per-box formula itself is tested in test_losses.py; here the term of a batch is checked
against an independent computation: torchvision's Matcher and BoxCoder for the GT deltas, the
anchors found in the canvas by their boxes, and the teacher's cached deltas in the image's order.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, tiny_overrides
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import box_iou

import sadpipe.tasks.distill as distill
from sadpipe.settings import load_settings
from sadpipe.data.dataset import labeled_source
from sadpipe.tasks.dump import dump_teacher
from sadpipe.models import save_checkpoint
from sadpipe.engine.device import AnchorCache
from sadpipe.tasks.supervised import build_model_for
from sadpipe.errors import TrainingError

TOY = REPO / "pipelines" / "toy.toml"
STUDENT = ["student.model.tiny_widths=[8,16,32,64]", "student.model.fpn_channels=16"]
CPU = torch.device("cpu")


def _cfg(root, *extra):
    return load_settings(TOY, tiny_overrides(root) + STUDENT + list(extra))


def _batch(layout, g) -> dict:
    """Two labeled images on a 128x256 canvas; the first has cached teacher deltas, the second none."""
    padded = [(128, 128), (128, 256)]
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 5.0, 120.0, 50.0]]),
             torch.tensor([[130.0, 30.0, 200.0, 100.0]])]
    teacher_box = torch.randn(layout.num_anchors(padded[0]), 4, generator=g).mul(0.3).half()
    return {"image_id": [1, 2], "images": torch.randn(2, 3, 128, 256, generator=g), "canvas": (128, 256),
            "padded_size": padded, "labeled": [True, True], "view": ["orig", "orig"], "boxes": boxes,
            "labels": [torch.tensor([1, 4]), torch.tensor([2])],
            "iscrowd": [torch.zeros(len(b), dtype=torch.bool) for b in boxes],
            "teacher": [None, None], "teacher_box": [teacher_box, None]}


def _expected_bounded(student, batch, margin: float) -> float:
    """mean over the first image's foreground anchors of e_s if e_s + margin > e_t else 0."""
    with torch.no_grad():
        _, bbox = student(batch["images"])
    canvas_anchors = student.layout.anchors(batch["canvas"])
    position = {tuple(a.tolist()): j for j, a in enumerate(canvas_anchors)}
    own = student.layout.anchors(batch["padded_size"][0])
    teacher_at = {position[tuple(a.tolist())]: batch["teacher_box"][0][k].double() for k, a in enumerate(own)}
    matched = Matcher(0.5, 0.4, allow_low_quality_matches=True)(box_iou(batch["boxes"][0], canvas_anchors))
    fg = torch.where(matched >= 0)[0]
    y = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(batch["boxes"][0][matched[fg]], canvas_anchors[fg])
    values = []
    for j, target in zip(fg.tolist(), y.double()):
        e_s = float(((bbox[0, j].double() - target) ** 2).sum())
        e_t = float(((teacher_at[j] - target) ** 2).sum())
        values.append(e_s if e_s + margin > e_t else 0.0)
    assert 0 < sum(v > 0 for v in values) < len(values), "want boxes on both sides of the bound"
    return sum(values) / len(values)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_bounded_regression_term_equals_a_hand_computation(toy_root, margin):
    cfg = _cfg(toy_root, "geometry.max_size=256", 'distill.method="none"', "distill.bounded_regression_weight=0.5",
               f"distill.bounded_regression_margin={margin}")
    student = build_model_for(cfg, "student", labeled_source(cfg.data, "train").categories).eval()
    batch = _batch(student.layout, torch.Generator().manual_seed(3))
    out = distill.batch_loss(student, batch, AnchorCache(student.layout, CPU), cfg.distill, cfg.student.train, CPU)
    loss, terms = out.total, out.terms
    expected = _expected_bounded(student, batch, margin)
    assert terms["bounded"] == pytest.approx(expected, rel=1e-5)
    # every sample is labeled: loss = cls + box + nu x bounded (nu = 0.5)
    assert terms["loss"] == pytest.approx(terms["cls"] + terms["box"] + 0.5 * expected, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(terms["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def stores(toy_root, tmp_path_factory):
    """One teacher (its checkpoint) dumped twice (orig view, 24 images): with and without its box regression."""
    base = tmp_path_factory.mktemp("chen")
    cfg = _cfg(toy_root)
    torch.manual_seed(0)
    teacher = build_model_for(cfg, "teacher", labeled_source(cfg.data, "train").categories)
    path = save_checkpoint(base / "teacher.pt", teacher)
    out = {"teacher": path}
    for name, box in (("with_box", True), ("without_box", False)):
        out[name] = base / f"{name}.zarr"
        dump_teacher(cfg, path, out[name], device="cpu", views=("orig",), with_box_regression=box, limit=24,
                     log=lambda *a: None)
    return out


def test_cached_teacher_deltas_are_the_teachers(toy_root, stores):
    from sadpipe.cache.reader import TeacherCache
    from sadpipe.data.dataset import DetectionDataset
    from sadpipe.models import load_detector
    cache = TeacherCache(stores["with_box"])
    image_id = cache.ok_image_ids()[0]
    box = cache.get_box_regression(image_id)
    # the teacher's own deltas on the image (toy images: one 128x128 canvas), stored as float16
    teacher = load_detector(stores["teacher"]).eval()
    src = labeled_source(_cfg(toy_root).data, "train")
    sample = DetectionDataset(src, teacher.preprocess, image_ids=[image_id])[0]
    with torch.no_grad():
        live = teacher(sample["image"][None])[1][0]
    assert box.dtype == torch.float16 and box.shape == live.shape
    torch.testing.assert_close(box.float(), live, atol=2e-3, rtol=2e-3)  # float16 rounding: ~1e-3 relative
    # the dense record's float32 box regression is the same values
    assert torch.equal(box.float(), cache.get(image_id).box_regression)
    with pytest.raises(Exception, match="--with-box-regression"):
        TeacherCache(stores["without_box"]).get_box_regression(image_id)


def test_a_student_trains_with_the_bounded_term_from_the_cache(toy_root, stores, tmp_path):
    cfg = _cfg(toy_root, 'distill.method="kd"', "distill.bounded_regression_weight=0.5", "student.train.hflip=false")
    distill.train_student(cfg, stores["with_box"], tmp_path / "run", device="cpu", max_steps=2, evaluate=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["bounded"] >= 0 and math.isfinite(r["bounded"])
        w = cfg.distill.loss_weight
        assert r["loss"] == pytest.approx(r["cls"] + r["box"] + w * r["distill"] + 0.5 * r["bounded"], rel=1e-5)


def test_the_bounded_term_without_stored_box_regression_is_refused_with_the_fix(toy_root, stores, tmp_path):
    cfg = _cfg(toy_root, 'distill.method="none"', "distill.bounded_regression_weight=0.5")
    with pytest.raises(TrainingError, match="--with-box-regression"):
        distill.train_student(cfg, stores["without_box"], tmp_path / "run", device="cpu", max_steps=1, evaluate=False)
