"""Student distillation from the teacher cache (sadpipe.tasks.distill).

A tiny teacher (fpn 32, widths 16..128) is dumped once per module into two stores on the toy
data: one with the orig and hflip views, one with orig only. The student is a smaller tiny
net (fpn 16, widths 8..64), so a built Detector's spec tells which of the two was built.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import REPO, tiny_overrides
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

import sadpipe.tasks.distill as distill
from sadpipe.cache import targets
from sadpipe.cache.codec import default_codec
from sadpipe.cache.format import CacheMismatchError
from sadpipe.cache.reader import TeacherCache
from sadpipe.settings import load_settings
from sadpipe.data.dataset import DetectionDataset, collate, labeled_source
from sadpipe.tasks.dump import dump_teacher
from sadpipe.models import load_detector, save_checkpoint
from sadpipe.engine.device import AnchorCache
from sadpipe.tasks.supervised import build_model_for
from sadpipe.config import ConfigError
from sadpipe.engine.loop import Hooks
from sadpipe.errors import TrainingError
from sadpipe.models import Detector

TOY = REPO / "pipelines" / "toy.toml"
STUDENT = ["student.model.tiny_widths=[8,16,32,64]", "student.model.fpn_channels=16"]
CPU = torch.device("cpu")
UNLABELED_FIRST_ID = 200_001  # sadpipe.data.toy: unlabeled ids start here


class SpyCache(TeacherCache):
    """A TeacherCache that records each compact record read, (image id, view), into ``gets``."""

    def __init__(self, path, gets: list):
        super().__init__(path)
        self.gets = gets

    def get_compact(self, image_id, view="orig"):
        self.gets.append((int(image_id), view))
        return super().get_compact(image_id, view)


def _cfg(root, *extra):
    return load_settings(TOY, tiny_overrides(root) + STUDENT + list(extra))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _final_state(run_dir) -> dict:
    return torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def world(toy_root, tmp_path_factory):
    """Teacher checkpoint and two complete stores of it (48 labeled + 32 unlabeled toy images)."""
    base = tmp_path_factory.mktemp("distill")
    cfg = _cfg(toy_root)
    torch.manual_seed(0)
    teacher = build_model_for(cfg, "teacher", labeled_source(cfg.data, "train").categories)
    with torch.no_grad():  # spread the logits over many codec bins, with detections above 0.5
        teacher.head.classification_head.cls_logits.weight.normal_(0.0, 0.1)
        teacher.head.classification_head.cls_logits.bias.fill_(-3.5)
    teacher_path = save_checkpoint(base / "teacher.pt", teacher)
    both, orig = base / "both.zarr", base / "orig.zarr"
    dump_teacher(cfg, teacher_path, both, device="cpu", views=("orig", "hflip"), log=lambda *a: None)
    dump_teacher(cfg, teacher_path, orig, device="cpu", views=("orig",), log=lambda *a: None)
    return {"root": toy_root, "teacher": teacher_path, "both": both, "orig": orig}


# ---------------------------------------------------------------------------------------------
# The loss of one batch against an independent computation


def _adl_by_hand(s: torch.Tensor, t: torch.Tensor, *, method: str, beta: float, gamma: float, variant: str,
                 temperature: float) -> torch.Tensor:
    """Per-entry distillation loss in float64 straight from the formulas (docs/method.md, section "Notation")."""
    s, t = s.double(), t.double()
    if method == "weighted_ce":  # Chen et al.'s soft CE, sigmoid form: w1 = 1 on q, w0 = 1.5 on 1 - q
        p, q = torch.sigmoid(s), torch.sigmoid(t)
        return -(q * torch.log(p) + 1.5 * (1 - q) * torch.log(1 - p))
    if method == "kd":
        s, t = s / temperature, t / temperature
    p, q = torch.sigmoid(s), torch.sigmoid(t)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    if method == "kd":
        return kl * temperature**2
    entropy = -(q * torch.log(q) + (1 - q) * torch.log(1 - q))
    if method == "fdl":
        beta = 0.0
    weight = (1 - torch.exp(-(kl + beta * entropy))) ** gamma
    return weight * (kl if variant == "paper" else kl + entropy)


def _hand_batch(layout, num_classes: int) -> dict:
    """Three samples on a 128x256 canvas: a labeled 128x128 image with two boxes, an unlabeled
    128x256 image, and a labeled 128x128 flipped image without teacher logits (store lacks hflip)."""
    g = torch.Generator().manual_seed(1)
    padded = [(128, 128), (128, 256), (128, 128)]
    codec = default_codec()
    # a weak-teacher image (dense record) and a confident one (sparse record)
    logits = [torch.randn(layout.num_anchors(p), num_classes, generator=g) * 2.5 + loc
              for p, loc in zip(padded[:2], (-3.0, -7.0))]
    compact = [_compact(codec, z) for z in logits]
    assert {c.encoding for c in compact} == {targets.DENSE, targets.SPARSE}
    # the expected values use the codec's own CPU decode of the dense codes, independent of targets.decode
    decoded = [codec.decode(codec.encode(z)).float() for z in logits] + [None]
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 5.0, 120.0, 50.0]]), torch.zeros(0, 4),
             torch.tensor([[30.0, 30.0, 100.0, 100.0]])]
    labels = [torch.tensor([1, 4]), torch.zeros(0, dtype=torch.int64), torch.tensor([2])]
    return {"image_id": [1, UNLABELED_FIRST_ID, 2], "images": torch.randn(3, 3, 128, 256, generator=g),
            "canvas": (128, 256), "padded_size": padded, "labeled": [True, False, True],
            "view": ["orig", "orig", "hflip"], "boxes": boxes, "labels": labels,
            "iscrowd": [torch.zeros(len(b), dtype=torch.bool) for b in boxes], "teacher": compact + [None],
            "teacher_dense": decoded}


def _compact(codec, logits) -> targets.CompactTargets:
    """The record a dump stores for these logits, as the student's loader hands it over."""
    return targets.targets_from_codes(codec.encode(logits), codec)


def _expected_distill(student, batch, dcfg, method):
    """sum over samples with teacher logits of the per-entry loss at the sample's anchors inside the
    canvas, ignored anchors of labeled images left out, over max(1, sum q^power) of the same entries."""
    layout = student.layout
    with torch.no_grad():
        cls, _ = student(batch["images"])
    canvas_anchors = layout.anchors(batch["canvas"])
    # where an image's anchor sits in the canvas, found by its box (anchors are unique boxes)
    position = {tuple(a.tolist()): j for j, a in enumerate(canvas_anchors)}
    assert len(position) == len(canvas_anchors)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)  # torchvision RetinaNet's
    total, norm, ignored_seen = 0.0, 0.0, 0
    for i, t in enumerate(batch["teacher_dense"]):
        if t is None:
            continue
        idx = torch.tensor([position[tuple(a.tolist())] for a in layout.anchors(batch["padded_size"][i])])
        keep = torch.ones(len(idx), dtype=torch.bool)
        if batch["labeled"][i]:
            matched = matcher(box_iou(batch["boxes"][i], canvas_anchors))
            keep = matched[idx] != Matcher.BETWEEN_THRESHOLDS
            ignored_seen += int((~keep).sum())
        per_entry = _adl_by_hand(cls[i, idx], t, method=method, beta=dcfg.beta, gamma=dcfg.gamma,
                                 variant=dcfg.variant, temperature=dcfg.temperature)
        total += float(per_entry[keep].sum())
        norm += float((torch.sigmoid(t.double()[keep]) ** dcfg.normalizer_power).sum())
    return total / max(1.0, norm), max(1.0, norm), ignored_seen


@pytest.mark.parametrize("method,extra", [
    ("adl", []), ("adl", ['distill.variant="released"', "distill.beta=0.3", "distill.gamma=1.5"]),
    ("fdl", []), ("kd", ["distill.temperature=2.0"]), ("sad", []), ("weighted_ce", ["distill.hard_weight=0.3"]),
])
def test_batch_distillation_term_equals_a_hand_computation(toy_root, method, extra):
    cfg = _cfg(toy_root, "geometry.max_size=256", f'distill.method="{method}"', *extra)
    student = build_model_for(cfg, "student", labeled_source(cfg.data, "train").categories).eval()  # eval: fixed BN
    batch = _hand_batch(student.layout, student.num_classes)
    out = distill.batch_loss(student, batch, AnchorCache(student.layout, CPU), cfg.distill, cfg.student.train, CPU,
                             code_table=targets.code_table(default_codec()))
    loss, terms = out.total, out.terms

    expected, norm, ignored = _expected_distill(student, batch, cfg.distill, method)
    assert ignored > 0, "the labeled image should have anchors the matcher ignores"
    assert terms["distill"] == pytest.approx(expected, rel=1e-5)
    assert terms["normalizer"] == pytest.approx(norm, rel=1e-5)
    # hard loss on the two labeled samples of three (the unlabeled one has no targets), plus weight x distill;
    # weighted_ce: mu x focal + box on those, plus (1 - mu) x soft (Chen et al.'s mix, mu = 0.3)
    if method == "weighted_ce":
        mu = 0.3
        assert terms["loss"] == pytest.approx((mu * terms["cls"] + terms["box"]) * 2 / 3 + (1 - mu) * expected,
                                              rel=1e-5)
    else:
        w = cfg.distill.loss_weight
        assert terms["loss"] == pytest.approx((terms["cls"] + terms["box"]) * 2 / 3 + w * expected, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(terms["loss"], rel=1e-6)


def test_flipped_sample_without_a_stored_hflip_view_gets_no_distillation(world):
    cfg = _cfg(world["root"], 'distill.method="adl"')
    src = labeled_source(cfg.data, "train")
    student = build_model_for(cfg, "student", src.categories).eval()
    ids = [r.image_id for r in src.images][:8]
    base = DetectionDataset(src, student.preprocess, image_ids=ids, hflip=True, seed=0)
    views = [base.view_of(i) for i in ids]
    assert 0 < views.count("hflip") < len(ids), views  # the seeded flips mix both views here

    gets = []
    cache = SpyCache(world["orig"], gets)
    dataset = distill.WithTeacher(base, cache, None)
    batch = collate([dataset[k] for k in range(len(ids))])
    assert sorted(gets) == sorted((i, "orig") for i, v in zip(ids, views) if v == "orig")
    batch["teacher_dense"] = []
    for i, v, t in zip(ids, views, batch["teacher"]):
        if v == "hflip":
            assert t is None
            batch["teacher_dense"].append(None)
        else:  # the record of this image, decoded by the codec from its dense codes
            dense = cache.codec.decode(cache.get_codes(i, "orig")).float()
            assert torch.equal(targets.decode(t, cache.code_table), dense)
            batch["teacher_dense"].append(dense)
    terms = distill.batch_loss(student, batch, AnchorCache(student.layout, CPU), cfg.distill, cfg.student.train, CPU,
                               code_table=cache.code_table).terms
    expected, _, _ = _expected_distill(student, batch, cfg.distill, "adl")
    assert terms["distill"] == pytest.approx(expected, rel=1e-5)


def test_cache_targets_agree_with_the_live_teacher(world):
    # the online path (teacher forward on the canvas) and the cache path give the same distillation
    # term up to the codec's quantisation (the default codec's loss error is about 1 % on the toy
    # teacher: docs/codec.md, section "Results")
    cfg = _cfg(world["root"], 'distill.method="adl"', "student.train.hflip=false")
    src = labeled_source(cfg.data, "train")
    student = build_model_for(cfg, "student", src.categories).eval()
    dataset = distill.WithTeacher(DetectionDataset(src, student.preprocess, image_ids=[r.image_id for r in src.images][:6]),
                                  TeacherCache(world["both"]), None)
    batch = collate([dataset[k] for k in range(len(dataset))])
    anchors = AnchorCache(student.layout, CPU)
    cached = distill.batch_loss(student, batch, anchors, cfg.distill, cfg.student.train, CPU,
                                code_table=dataset.cache.code_table).terms
    live = distill.batch_loss(student, batch, anchors, cfg.distill, cfg.student.train, CPU,
                              teacher=load_detector(world["teacher"]).eval()).terms
    assert live["distill"] == pytest.approx(cached["distill"], rel=2e-2)
    assert live["distill"] != cached["distill"]  # really two different target sources


# ---------------------------------------------------------------------------------------------
# train_student: what it builds and reads, every method


def test_training_reads_the_cache_and_never_builds_the_teacher(world, tmp_path):
    # every Detector constructed in the run, whoever builds it: torch calls this hook when a module
    # registers a submodule, as Detector.__init__ does with its backbone and head
    detectors = {}

    def record(module, name, submodule):
        if isinstance(module, Detector):
            detectors[id(module)] = module

    handle = torch.nn.modules.module.register_module_module_registration_hook(record)
    gets, seen = [], []
    try:
        cfg = _cfg(world["root"], 'distill.method="sad"')
        distill.train_student(cfg, SpyCache(world["both"], gets), tmp_path / "run", device="cpu", max_steps=2,
                              evaluate=False, hooks=Hooks(on_batch=lambda step, batch: seen.extend(
                                  zip(batch["image_id"], batch["view"]))))
    finally:
        handle.remove()
    built = [d.spec for d in detectors.values()]

    teacher_spec = torch.load(world["teacher"], weights_only=False)["spec"]
    assert len(built) == 1, [(s["arch"], s["fpn_channels"]) for s in built]
    assert built[0]["fpn_channels"] == 16 and built[0]["tiny_widths"] == [8, 16, 32, 64]
    assert teacher_spec["fpn_channels"] == 32  # so the spy would have told them apart
    # one cache read per sample, of that sample's own id and view; step 2 (mixed stream) has unlabeled images
    assert len(seen) == 16 and Counter(gets) == Counter(seen)
    assert any(i >= UNLABELED_FIRST_ID for i, _ in seen[8:]) and {v for _, v in seen} == {"orig", "hflip"}


@pytest.mark.parametrize("method", ["none", "kd", "fdl", "adl", "sad", "data_distillation", "weighted_ce"])
def test_every_method_trains_and_logs_its_terms(world, tmp_path, method, capsys):
    cfg = _cfg(world["root"], f'distill.method="{method}"')
    cache = None if method == "none" else world["both"]  # the student alone needs no cache
    summary = distill.train_student(cfg, cache, tmp_path / "run", device="cpu", max_steps=2, evaluate=False)
    # plain KD alone is told that the default codec (floor 0.03) rounds the background it weighs
    assert ("note: plain KD through a cache whose codec rounds every q below 0.03" in capsys.readouterr().out) \
        == (method == "kd")
    assert summary["steps"] == 2 and (tmp_path / "run" / "final.pt").is_file()
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    # the lr each step used: lr 1e-3, warm-up of 2 steps (tiny_overrides): factors 1/2, 2/2
    assert [r["lr"] for r in records] == pytest.approx([0.5e-3, 1e-3])
    alternates = method in ("sad", "data_distillation")
    assert [r["stream"] for r in records] == ([0, 1] if alternates else [0, 0])
    for r in records:
        assert ("distill" in r) == (method in ("kd", "fdl", "adl", "sad", "weighted_ce")), r
        assert math.isfinite(r["loss"]) and r["cls"] > 0 and r["box"] >= 0
        if "distill" in r:
            assert r["distill"] > 0 and r["normalizer"] >= 1
    first = records[0]  # labeled stream: every sample has GT, so loss = cls + box + weight x distill
    if method == "weighted_ce":  # mu x cls + box + (1 - mu) x soft, mu = 0.5 by default
        assert first["loss"] == pytest.approx(0.5 * first["cls"] + first["box"] + 0.5 * first["distill"], rel=1e-5)
    else:
        w = cfg.distill.loss_weight
        assert first["loss"] == pytest.approx(first["cls"] + first["box"] + w * first.get("distill", 0.0), rel=1e-5)


@pytest.mark.parametrize("method", [
    ['distill.method="data_distillation"'],
    ['distill.method="sad"', "distill.pseudo_labels=true"],  # the released code's SAD: ADL + the same hard targets
])
def test_pseudo_labels_are_the_stored_detections_above_the_threshold(world, tmp_path, method):
    thresh = 0.6  # the test teacher's stored scores span ~0.4-0.99: some kept, some dropped
    captured = []

    def on_step(record, batch, loss, model):  # loss.hard_targets: what the detection loss was given
        captured.append({"batch": batch, "targets": loss.hard_targets, "record": record})

    cfg = _cfg(world["root"], *method, f"distill.pseudo_score_thresh={thresh}")
    distill.train_student(cfg, world["both"], tmp_path / "run", device="cpu", max_steps=2, evaluate=False,
                          hooks=Hooks(on_step=on_step))

    cache = TeacherCache(world["both"])
    src = labeled_source(cfg.data, "train")
    unlabeled_checked, kept, dropped = 0, 0, 0
    for step in captured:
        batch, targets = step["batch"], step["targets"]
        assert len(targets) == len(batch["image_id"])  # every sample has (pseudo) targets
        for i, image_id in enumerate(batch["image_id"]):
            if batch["labeled"][i]:  # GT boxes of the resized image (toy images are 128 px: scale 1)
                gt = src.targets(image_id)
                assert torch.equal(targets[i]["labels"].cpu(), torch.as_tensor(gt["labels"]))
                continue
            rec = cache.get(image_id, batch["view"][i])
            above = rec.det_scores >= thresh
            assert torch.equal(targets[i]["boxes"], rec.det_boxes[above])
            assert torch.equal(targets[i]["labels"], rec.det_labels[above])
            unlabeled_checked += 1
            kept, dropped = kept + int(above.sum()), dropped + int((~above).sum())
    assert unlabeled_checked > 0 and kept > 0 and dropped > 0
    # SAD distils on every step besides; data distillation never does
    assert all(("distill" in step["record"]) == (cfg.distill.method == "sad") for step in captured)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("override,names,not_names", [
    ("geometry.anchor_sizes=[24,48,96,192,384]", "anchor layout differs", ("preprocessing", "classes")),
    ("geometry.image_mean=[0.5,0.5,0.5]", "preprocessing differs", ("anchor layout", "class")),
    ("CLASSES", "class names differ", ("anchor layout", "preprocessing")),
])
def test_a_store_of_other_anchors_classes_or_preprocessing_is_refused(world, tmp_path, override, names, not_names):
    if override == "CLASSES":  # same images and ids, one category renamed
        ann = json.loads((world["root"] / "train/annotations.json").read_text())
        ann["categories"][2]["name"] = "hexagon"
        path = tmp_path / "renamed.json"
        path.write_text(json.dumps(ann))
        override = f"data.train_annotations={json.dumps(str(path))}"
    cfg = _cfg(world["root"], 'distill.method="adl"', override)
    with pytest.raises(CacheMismatchError, match=names) as info:
        distill.train_student(cfg, world["both"], tmp_path / "run", device="cpu", max_steps=1, evaluate=False)
    message = str(info.value)
    assert str(world["both"]) in message and not any(n in message for n in not_names), message
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_a_distilling_method_without_a_cache_is_a_clear_error(world, tmp_path):
    with pytest.raises(TrainingError, match=r"needs a teacher cache: pass --cache"):
        distill.train_student(_cfg(world["root"], 'distill.method="sad"'), None, tmp_path / "run", device="cpu",
                              max_steps=1, evaluate=False)
    with pytest.raises(ConfigError, match="distill.method must be one of"):
        _cfg(world["root"], 'distill.method="ADL"')  # the settings refuse it before any run starts


def test_resume_without_state_is_a_clear_error(world, tmp_path):
    with pytest.raises(TrainingError, match=r"--resume: no .*train_state\.pt.*without --resume"):
        distill.train_student(_cfg(world["root"]), world["both"], tmp_path / "never", device="cpu", resume=True,
                              evaluate=False)


def test_starting_over_an_existing_run_is_refused_and_leaves_it_intact(world, tmp_path):
    out = tmp_path / "run"
    distill.train_student(_cfg(world["root"]), world["both"], out, device="cpu", max_steps=1, evaluate=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TrainingError, match=r"already holds a run.*--resume"):
        # another config: the existing run's resolved config must not be overwritten either
        distill.train_student(_cfg(world["root"], "student.train.lr=0.5"), world["both"], out, device="cpu",
                              max_steps=2, evaluate=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# resume and DDP


class _Interrupt(Exception):
    pass


def test_resume_is_bit_exact_across_both_streams(world, tmp_path):
    """18 steps straight vs. 15 (state saved at 14), a crash, then resume: identical weights and logs.

    SAD alternates a labeled stream (48 images / 8 = 6 batches per epoch) and a mixed stream
    (80 / 8 = 10): after 14 steps the labeled stream has used 7 batches (it is one batch into
    its second epoch) and the mixed stream 7 (still in its first). Flips are on and decided per
    (epoch, image), so each stream must resume at its own batch *and* epoch, and one stream's
    epoch must not leak into the other's flips (the labeled images are in both streams).
    Measured: a shared labeled dataset object flipped different images in steps 17 and 18.
    """
    extra = ('distill.method="sad"', "student.train.max_steps=18", "student.train.checkpoint_every_steps=7",
             "student.train.hflip=true")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    distill.train_student(_cfg(world["root"], *extra), world["both"], straight, device="cpu", evaluate=False)

    def crash_in_step_15(done, batch):
        if done == 14:  # 14 steps done: the 15th batch is there, its loss not computed
            raise _Interrupt

    with pytest.raises(_Interrupt):
        distill.train_student(_cfg(world["root"], *extra), world["both"], crashed, device="cpu", evaluate=False,
                              hooks=Hooks(on_batch=crash_in_step_15))
    assert not (crashed / "final.pt").exists()
    assert torch.load(crashed / "train_state.pt", weights_only=False)["step"] == 14

    summary = distill.train_student(_cfg(world["root"], *extra), world["both"], crashed, device="cpu", resume=True,
                                    evaluate=False)
    assert summary["steps"] == 18
    a, b = _final_state(straight), _final_state(crashed)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"
    ma, mb = _metrics(straight), _metrics(crashed)
    assert [r["step"] for r in mb] == list(range(1, 19))
    keys = ("loss", "distill", "lr", "stream")
    assert [[r[k] for k in keys] for r in ma] == [[r[k] for k in keys] for r in mb]
    assert [r["stream"] for r in mb] == [0, 1] * 9


_DDP_DRIVER = """
# train-student under torchrun with two hooks: every rank saves its own student weights and the image ids it trained on
import sys, torch, torch.distributed as dist
from sadpipe.engine.loop import Hooks
from sadpipe.settings import load_settings
from sadpipe.tasks.distill import train_student
config, cache, out, max_steps = sys.argv[1:5]
cfg = load_settings(config, sys.argv[5:])
student, ids = {}, []
def on_step(record, batch, loss, model):
    ids.append(list(batch["image_id"]))
    student["module"] = model
train_student(cfg, cache, out, device="cpu", max_steps=int(max_steps), hooks=Hooks(on_step=on_step))
rank = dist.get_rank()
torch.save({"params": dict(student["module"].named_parameters()), "ids": ids}, out + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_process_ddp_run_keeps_the_ranks_identical(world, tmp_path):
    out = tmp_path / "ddp"
    driver = tmp_path / "driver.py"
    driver.write_text(_DDP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver),
           str(TOY), str(world["both"]), str(out), "3"]
    cmd += tiny_overrides(world["root"]) + STUDENT + ["student.train.batch_size=4", 'distill.method="sad"']
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    final = _final_state(out)
    # the ranks trained on different images at every step (else equal weights would prove nothing)
    assert len(r0["ids"]) == len(r1["ids"]) == 3
    assert all(not set(a) & set(b) for a, b in zip(r0["ids"], r1["ids"]))
    # parameters: identical on both ranks and in final.pt (BN running stats are per rank after the last
    # forward, which DDP syncs from rank 0 only at the next forward)
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
        assert torch.equal(p, final[name]), name
    cfg = _cfg(world["root"])
    torch.manual_seed(cfg.student.train.seed)  # the run's initial weights (train_student seeds the same)
    init = build_model_for(cfg, "student", labeled_source(cfg.data, "train").categories)
    assert any(not torch.equal(p, r0["params"][n]) for n, p in init.named_parameters())  # it did train
    assert len(_metrics(out)) == 3  # rank 0 alone writes the log


# ---------------------------------------------------------------------------------------------
# joining the config's images to the cache (by id, checked by path)


def test_a_cache_of_other_files_with_the_same_ids_is_refused_with_both_paths(world, tmp_path):
    # the same images under another folder name: ids and pixels agree, the stored paths do not
    (world["root"] / "train_copy").mkdir(exist_ok=True)
    link = world["root"] / "train_copy" / "images"
    if not link.exists():
        link.symlink_to(world["root"] / "train" / "images")
    cfg = _cfg(world["root"], 'distill.method="adl"', 'data.train_images="train_copy/images"')
    with pytest.raises(TrainingError, match="dumped from other files") as info:
        distill.train_student(cfg, world["both"], tmp_path / "run", device="cpu", max_steps=1, evaluate=False)
    message = str(info.value)
    first_id = labeled_source(cfg.data, "train").images[0].image_id
    stored = TeacherCache(world["both"]).image_facts(first_id)["path"]
    assert stored.startswith("train/images/")  # relative to the dump's data root
    assert f"image id {first_id}: cache {stored!r} vs this run 'train_copy/images/" in message
    assert "48 of 48 ids disagree" in message  # the toy world's 48 labeled images
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_images_missing_from_the_cache_are_counted_labeled_ones_train_on_ground_truth(world, tmp_path, capsys):
    cfg = _cfg(world["root"], 'distill.method="adl"')
    partial = tmp_path / "partial.zarr"
    dump_teacher(cfg, world["teacher"], partial, device="cpu", views=("orig",), limit=40, log=lambda *a: None)
    cache = TeacherCache(partial)
    src = labeled_source(cfg.data, "train")
    lines = []
    ids = distill.join_cache(cfg.data, src.images, cache, "labeled", keep_missing=True, log=lines.append)
    all_ids = [r.image_id for r in src.images]
    assert ids == all_ids  # 48 labeled images; the plan's first 40 are in the cache
    assert lines == ["labeled stream: 48 images in the config, 40 with teacher targets, 0 failed in the dump and 8 "
                     "missing from the cache (8 train without distillation)"]
    dataset = distill.WithTeacher(DetectionDataset(src, build_model_for(cfg, "student", src.categories).preprocess,
                                                   image_ids=ids), cache, None)
    missing = [k for k, i in enumerate(ids) if i not in cache]
    assert len(missing) == 8
    sample = dataset[missing[0]]
    assert sample["teacher"] is None and len(sample["boxes"]) > 0  # ground truth, no teacher targets
    assert dataset[0]["teacher"] is not None
    # unlabeled images the cache lacks have nothing to learn from: refused when none is there
    with pytest.raises(TrainingError, match="none of the 32 unlabeled images"):
        distill.join_cache(cfg.data, distill.unlabeled_source(cfg.data).images, cache, "unlabeled", keep_missing=False,
                           log=lines.append)
    # the run prints the counts and trains
    distill.train_student(cfg, partial, tmp_path / "run", device="cpu", max_steps=1, evaluate=False)
    assert "8 missing from the cache (8 train without distillation)" in capsys.readouterr().out
