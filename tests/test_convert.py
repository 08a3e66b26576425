"""Converting MMDetection-format checkpoints without MMDetection: loading, classes, refusals, safe reading,
and a converted teacher through evaluate, dump-teacher and cache fidelity.

The files are written by tests/foreign_files.py from a random sadpipe model of MMDetection's
structure; tests/test_convert_mmdet.py compares conversions with MMDetection itself.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, tiny_overrides
from foreign_files import mmdet_names, mmdet_style_model, write_mmdet_checkpoint
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

from sadpipe.cli import main
from sadpipe.config import load_config
from sadpipe.convert import convert_with_provenance, geometry_table
from sadpipe.convert.mmdet import read_config_text
from sadpipe.labeling import postprocess
from sadpipe.models import CheckpointError, load_detector, save_checkpoint
from sadpipe.transforms import geometry_from_config, pad_batch

# COCO's 80 used categories, independently of sadpipe: the non-"N/A" slots of torchvision's 91-slot list
_NAMES91 = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
COCO_IDS = [i for i, n in enumerate(_NAMES91) if i > 0 and n != "N/A"]
COCO_NAMES = [_NAMES91[i] for i in COCO_IDS]
TOY = REPO / "pipelines" / "toy.toml"


@pytest.fixture(scope="module")
def coco_teacher():
    return mmdet_style_model(80, seed=0)


def _forward(model, image: np.ndarray, reference=None):
    """sadpipe's geometry: Preprocess (resize + normalise), pad to the divisor, forward (also through reference)."""
    x = model.preprocess(image)
    size, padded = model.preprocess.sizes(*image.shape[:2])
    batch, canvas = pad_batch([x], [padded])
    with torch.no_grad():
        cls, box = model(batch)
        ref = reference(batch) if reference is not None else None
    return cls, box, size, canvas, ref


def test_converted_teacher_loads_and_runs_with_sadpipe_geometry(coco_teacher, tmp_path):
    src = write_mmdet_checkpoint(tmp_path / "mmdet.pth", coco_teacher, COCO_NAMES)
    ours = load_detector(src, source="mmdet", min_size=128, max_size=192)
    assert ours.spec["category_ids"] == COCO_IDS and ours.spec["class_names"] == COCO_NAMES
    expected = coco_teacher.state_dict()
    assert set(ours.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())
    # the structure MMDetection's weights need, recorded in the spec
    assert ours.spec["fpn_p6_input"] == "c5" and ours.spec["fpn_relu_before_p7"] is False
    assert ours.spec["layout"]["rounded_anchors"] is False and ours.preprocess.max_size == 192

    image = np.random.default_rng(0).integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    cls, box, size, canvas, (ref_cls, ref_box) = _forward(ours, image, reference=coco_teacher)
    assert size == (128, 192) and canvas == (128, 256)
    assert cls.shape == (1, ours.layout.num_anchors(canvas), 80)
    assert torch.equal(cls, ref_cls) and torch.equal(box, ref_box)
    dets = postprocess(cls, box, ours.layout.anchors(canvas), [size], ours.layout.anchors_per_level(canvas))[0]
    assert len(dets["boxes"]) > 0

    saved = save_checkpoint(tmp_path / "teacher.pt", ours)
    again = load_detector(saved)  # an ordinary sadpipe checkpoint now
    assert again.spec == ours.spec
    assert torch.equal(_forward(again, image)[0], cls)


def test_printed_geometry_is_what_a_pipeline_needs(coco_teacher, tmp_path):
    src = write_mmdet_checkpoint(tmp_path / "mmdet.pth", coco_teacher, COCO_NAMES)
    ours = load_detector(src, source="mmdet")
    overrides = [f"geometry.{k}={json.dumps(v)}" for k, v in geometry_table(ours).items()]
    layout, preprocess = geometry_from_config(load_config(TOY, overrides))
    assert layout == ours.layout and layout.fingerprint() == ours.layout.fingerprint()
    assert preprocess == ours.preprocess


def test_class_names_in_another_order_are_permuted_to_sorted_ids(coco_teacher, tmp_path):
    shuffled = list(np.random.default_rng(1).permutation(80))
    names = [COCO_NAMES[i] for i in shuffled]  # the file's label k is COCO category COCO_IDS[shuffled[k]]
    src = write_mmdet_checkpoint(tmp_path / "mmdet.pth", coco_teacher, names)
    ours = load_detector(src, source="mmdet")
    assert ours.spec["category_ids"] == COCO_IDS and ours.spec["class_names"] == COCO_NAMES
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cls, box = ours(x)
        ref_cls, ref_box = coco_teacher(x)
    for label, name in enumerate(ours.spec["class_names"]):
        assert torch.equal(cls[..., label], ref_cls[..., names.index(name)]), name
    assert torch.equal(box, ref_box)


def test_class_names_of_another_dataset(tmp_path, toy_root):
    model = mmdet_style_model(3, seed=1)
    src = write_mmdet_checkpoint(tmp_path / "mmdet.pth", model, ["ring", "Circle", "triangle"])
    with pytest.raises(CheckpointError, match=r"class names \['ring', 'Circle', 'triangle'\] are not in COCO"):
        load_detector(src, source="mmdet")
    categories = json.loads((toy_root / "val" / "annotations.json").read_text())["categories"]
    ours = load_detector(src, source="mmdet", categories=categories)
    # toy ids: circle 1, triangle 3, ring 6 -> labels in id order
    assert ours.spec["category_ids"] == [1, 3, 6] and ours.spec["class_names"] == ["circle", "triangle", "ring"]


def test_without_class_names(coco_teacher, tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": mmdet_names(coco_teacher.state_dict()), "meta": {}}, path)
    model, provenance = convert_with_provenance(path, "mmdet")
    assert model.spec["category_ids"] == COCO_IDS and "assumed COCO's 80" in provenance["classes"]
    torch.save({"state_dict": mmdet_names(mmdet_style_model(6).state_dict()), "meta": {}}, path)
    with pytest.raises(CheckpointError, match="names no classes and its head has 6"):
        load_detector(path, source="mmdet")


CONFIG_TEXT = """
model = dict(
    type='RetinaNet',
    backbone=dict(type='ResNet', depth=18, style='pytorch', norm_eval=True),
    neck=dict(type='FPN', in_channels=[64, 128, 256, 512], out_channels=64, start_level=1,
              add_extra_convs='on_input', relu_before_extra_convs=True, num_outs=5),
    bbox_head=dict(type='RetinaHead', num_classes=6, in_channels=64, stacked_convs=4, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=2, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                        target_stds=[1.0, 1.0, 1.0, 1.0])),
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32))
side_effect = __import__('os').remove('{victim}')
"""


def test_settings_come_from_the_config_text_without_executing_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    text = CONFIG_TEXT.replace("{victim}", str(victim))
    assert read_config_text(text)["model"]["neck"]["relu_before_extra_convs"] is True
    assert "side_effect" not in read_config_text(text)  # not a literal: skipped, never run
    src = write_mmdet_checkpoint(tmp_path / "m.pth", mmdet_style_model(6), ["circle", "square", "triangle", "star",
                                                                        "cross", "ring"], cfg=text)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(["circle", "square", "triangle", "star", "cross",
                                                                  "ring"])]
    ours = load_detector(src, source="mmdet", categories=categories)
    assert victim.read_text() == "still here"
    assert ours.layout.sizes == (16.0, 32.0, 64.0, 128.0, 256.0)  # octave_base_scale 2 x strides
    assert ours.spec.get("fpn_relu_before_p7", True) is True and ours.spec["fpn_p6_input"] == "c5"


def _file(tmp_path, state, classes=COCO_NAMES, name="bad.pth"):
    path = tmp_path / name
    torch.save({"state_dict": state, "meta": {"dataset_meta": {"classes": tuple(classes)}}}, path)
    return path


def test_other_kinds_are_refused_naming_what_was_found(coco_teacher, tmp_path):
    good = mmdet_names(coco_teacher.state_dict())
    backbone = {k: v for k, v in good.items() if k.startswith(("backbone.", "neck."))}
    w = torch.zeros(1)
    fcos = {**backbone, "bbox_head.conv_cls.weight": w, "bbox_head.conv_reg.weight": w,
            "bbox_head.conv_centerness.weight": w}
    with pytest.raises(CheckpointError, match=r"not a RetinaNet.*FCOS head \(conv_centerness\)"):
        load_detector(_file(tmp_path, fcos), source="mmdet")
    faster = {**backbone, "rpn_head.rpn_conv.weight": w, "roi_head.bbox_head.fc_cls.weight": w}
    with pytest.raises(CheckpointError, match=r"not a RetinaNet.*two-stage detector"):
        load_detector(_file(tmp_path, faster), source="mmdet")

    wide = dict(good)  # head convs 128 wide on a 64-channel FPN
    wide["bbox_head.cls_convs.1.conv.weight"] = torch.zeros(128, 64, 3, 3)
    with pytest.raises(CheckpointError, match=r"bbox_head\.cls_convs\.1\.conv\.weight has shape \[128, 64, 3, 3\]"):
        load_detector(_file(tmp_path, wide), source="mmdet")
    missing = {k: v for k, v in good.items() if k != "neck.fpn_convs.3.conv.weight"}
    with pytest.raises(CheckpointError, match=r"missing key 'neck\.fpn_convs\.3\.conv\.weight'"):
        load_detector(_file(tmp_path, missing), source="mmdet")
    missing_bn = {k: v for k, v in good.items() if k != "backbone.layer3.1.bn2.running_var"}
    with pytest.raises(CheckpointError, match=r"missing \['backbone\.layer3\.1\.bn2\.running_var'\]"):
        load_detector(_file(tmp_path, missing_bn), source="mmdet")
    gn = {**good, "bbox_head.cls_convs.0.gn.weight": torch.ones(64)}
    with pytest.raises(CheckpointError, match=r"no place for: \['bbox_head\.cls_convs\.0\.gn\.weight'\]"):
        load_detector(_file(tmp_path, gn), source="mmdet")
    five = {**good, "bbox_head.cls_convs.4.conv.weight": torch.zeros(64, 64, 3, 3)}
    with pytest.raises(CheckpointError, match=r"'bbox_head\.cls_convs' has 5 convs"):
        load_detector(_file(tmp_path, five), source="mmdet")
    with pytest.raises(CheckpointError, match="names 79 classes but its head has 80"):
        load_detector(_file(tmp_path, good, COCO_NAMES[:79]), source="mmdet")
    plain = tmp_path / "plain.pth"
    torch.save(good, plain)
    with pytest.raises(CheckpointError, match=r"not an MMDetection checkpoint.*found \['backbone\.bn1\.bias'"):
        load_detector(plain, source="mmdet")
    # without source=, a sadpipe reader points at the right option
    with pytest.raises(CheckpointError, match="MMDetection checkpoint.*--from mmdet"):
        load_detector(_file(tmp_path, good))


SIDE_EFFECTS: list[str] = []


def record_side_effect(tag):
    SIDE_EFFECTS.append(tag)
    return tag


class TrainingState:
    """Stands for a training framework's object (MMEngine's message hub) in a training checkpoint;
    unpickling it the ordinary way calls record_side_effect."""

    def __reduce__(self):
        return record_side_effect, ("unpickled",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_training_checkpoint_loads_without_running_its_objects(coco_teacher, tmp_path, zip_format):
    path = tmp_path / "epoch_12.pth"
    torch.save({"state_dict": mmdet_names(coco_teacher.state_dict()), "message_hub": {"log": TrainingState()},
                "meta": {"dataset_meta": {"classes": tuple(COCO_NAMES)}, "hist": np.arange(3)}}, path,
               _use_new_zipfile_serialization=zip_format)  # legacy: how torch < 1.6 saved (old zoo files)
    with open(path, "rb") as f:  # proof the file does run code when loaded the ordinary way
        assert torch.load(f, weights_only=False)["message_hub"]["log"] == "unpickled"
    SIDE_EFFECTS.clear()
    model = load_detector(path, source="mmdet")
    assert SIDE_EFFECTS == [] and model.spec["category_ids"] == COCO_IDS


class Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_a_file_that_calls_os_functions_is_refused(coco_teacher, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": mmdet_names(coco_teacher.state_dict()), "meta": {"x": Exploit()}}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_detector(path, source="mmdet")
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"model": {}, "x": Exploit()}))
    with pytest.raises(CheckpointError, match=r"names (posix|nt)\.system, which sadpipe does not load"):
        load_detector(pkl, source="detectron2")


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def test_converted_teacher_through_evaluate_dump_and_cache_fidelity(toy_root, tmp_path):
    """A toy-classes MMDetection-style teacher: converted, evaluated, dumped, and checked live against its store."""
    categories = json.loads((toy_root / "val" / "annotations.json").read_text())["categories"]
    names = [c["name"] for c in categories]
    model = mmdet_style_model(len(names), seed=3, anchor_sizes=(16, 32, 64, 128, 256))
    src = write_mmdet_checkpoint(tmp_path / "mmdet.pth", model, names, cfg=CONFIG_TEXT.replace("{victim}", "x"))
    teacher = tmp_path / "teacher.pt"
    result = _cli(["import-checkpoint", "--from", "mmdet", src, teacher, "--config", TOY,
                   "--categories", toy_root / "val" / "annotations.json"])
    assert result.exit_code == 0, result.output
    geometry = result.stdout.split("[geometry]\n", 1)[1]
    overrides = []
    for line in geometry.strip().splitlines():
        key, value = line.split(" = ", 1)
        overrides += ["--set", f"geometry.{key}={value}"]
    sets = [a for s in tiny_overrides(toy_root) for a in ("--set", s)] + overrides

    result = _cli(["evaluate", "--config", TOY, *sets, "--checkpoint", teacher, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "AP50" in result.stdout
    store = tmp_path / "cache.zarr"
    result = _cli(["dump-teacher", "--config", TOY, *sets, "--teacher", teacher, "--out", store, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = _cli(["cache", "fidelity", store, "--teacher", teacher, "--images", 2, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    # without the printed [geometry] the dump refuses this teacher, naming the anchors
    plain = [a for s in tiny_overrides(toy_root) for a in ("--set", s)]
    result = _cli(["dump-teacher", "--config", TOY, *plain, "--teacher", teacher, "--out", tmp_path / "c2.zarr",
                   "--device", "cpu"])
    assert result.exit_code == 2 and "anchor layout" in result.stderr
