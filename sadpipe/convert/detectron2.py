"""detectron2 RetinaNet checkpoints -> sadpipe Detector.

detectron2 writes ``{"model": {name: array}, ...}``: its model zoo's ``model_final_*.pkl`` is a
plain pickle of numpy arrays, training outputs (``model_final.pth``) are ``torch.save`` files. The
file holds no config, so detectron2's RetinaNet defaults (``configs/COCO-Detection/retinanet_*``,
``Base-RetinaNet.yaml``) are assumed, except where the weights say otherwise:

- backbone: ResNet with FrozenBN (eps 1e-5), MSRA style: a stage's stride-2 sits in the first 1x1
  conv of its first block (``RESNETS.STRIDE_IN_1X1 = True``; pass ``stride_in_1x1=False`` for a
  model trained from torchvision weights). Names ``bottom_up.res2..res5`` are torchvision's
  ``layer1..layer4``, ``shortcut`` is ``downsample``, ``convN.norm`` is ``bnN``.
- FPN: ``fpn_lateral3..5`` / ``fpn_output3..5`` (sum fusion, nearest x2 upsampling, which equals
  torchvision's resize to the finer map when sizes are multiples of 128); ``top_block.p6`` reads
  C5 (``res5``) or P5 as its input width says, and P7 reads ReLU(P6).
- head: ``cls_subnet`` / ``bbox_subnet`` are Sequential(conv, ReLU, ...) (parameters at 0, 2, 4, 6),
  ``cls_score`` / ``bbox_pred`` emit channel = anchor * width + j like torchvision, but detectron2's
  anchor index inside a cell is ``size_index * len(ratios) + ratio_index`` (DefaultAnchorGenerator
  loops sizes outside). The converter permutes those output channels so the sadpipe model keeps
  torchvision's order (``ratio_index * len(scales) + scale_index``): the cache's rows mean what
  they mean for every other sadpipe teacher.
- anchors: sizes ``32 * 2^(k/3)`` per level, ratios 0.5/1/2, offset 0, float corners (not rounded);
  older files also store them (``anchor_generator.cell_anchors.*``), which are checked.
- input: BGR pixels on 0-255, minus ``MODEL.PIXEL_MEAN`` = [103.53, 116.28, 123.675], divided by
  ``PIXEL_STD`` = [1, 1, 1]; older files store both as buffers ``pixel_mean`` / ``pixel_std``,
  which are then used. ``channel_order="RGB"`` for models trained with ``INPUT.FORMAT = "RGB"``.
- classes: 80 COCO categories in id order (detectron2's contiguous ids follow sorted COCO ids).

detectron2 does not install here; tests/test_convert_detectron2.py checks the conversion against a
forward pass written from these conventions, not against detectron2 itself.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..geometry import AnchorLayout
from ..models import CheckpointError, Detector
from ..transforms import Preprocess
from .files import as_tensor_state, read_checkpoint_file
from .names import Field, NameMap
from .retinanet import build_converted, categories_for_names, head_shape, permute_head_outputs, resnet_arch

PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
PIXEL_STD = (1.0, 1.0, 1.0)
ANCHOR_SIZES = (32.0, 64.0, 128.0, 256.0, 512.0)
ANCHOR_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # detectron2: [x, x * 2 ** (1/3), x * 2 ** (2/3)]
ASPECT_RATIOS = (0.5, 1.0, 2.0)
STRIDES = (8, 16, 32, 64, 128)


# (detectron2 name, torchvision name); a ResNet block of stage resN is torchvision's layer(N-1)
_NAMES = NameMap([
    ("backbone.bottom_up.stem.conv1.weight", "backbone.body.conv1.weight"),
    ("backbone.bottom_up.stem.conv1.norm.{norm}", "backbone.body.bn1.{norm}"),
    ("backbone.bottom_up.res{stage}.{block}.conv{k}.weight", "backbone.body.layer{stage}.{block}.conv{k}.weight"),
    ("backbone.bottom_up.res{stage}.{block}.conv{k}.norm.{norm}", "backbone.body.layer{stage}.{block}.bn{k}.{norm}"),
    ("backbone.bottom_up.res{stage}.{block}.shortcut.weight", "backbone.body.layer{stage}.{block}.downsample.0.weight"),
    ("backbone.bottom_up.res{stage}.{block}.shortcut.norm.{norm}",
     "backbone.body.layer{stage}.{block}.downsample.1.{norm}"),
    ("backbone.fpn_lateral{level}.{param}", "backbone.fpn.inner_blocks.{level}.0.{param}"),
    ("backbone.fpn_output{level}.{param}", "backbone.fpn.layer_blocks.{level}.0.{param}"),
    ("backbone.top_block.p{extra}.{param}", "backbone.fpn.extra_blocks.p{extra}.{param}"),
    ("head.cls_subnet.{conv}.{param}", "head.classification_head.conv.{conv}.0.{param}"),
    ("head.bbox_subnet.{conv}.{param}", "head.regression_head.conv.{conv}.0.{param}"),
    ("head.cls_score.{param}", "head.classification_head.cls_logits.{param}"),
    ("head.bbox_pred.{param}", "head.regression_head.bbox_reg.{param}"),
], {
    "stage": Field.shifted("[2-5]", "[1-4]", by=-1),
    "block": Field(r"\d+"),
    "k": Field("[1-3]"),
    "norm": Field(r"\w+"),  # FrozenBN: weight, bias, running_mean, running_var
    "level": Field.shifted("[3-5]", "[0-2]", by=-3),  # fpn_lateral3 is P3's, torchvision's inner_blocks.0
    "extra": Field("[67]"),
    # Sequential(conv, ReLU, conv, ...): the convs sit at even positions, torchvision's at 0, 1, 2, ...
    "conv": Field(r"\d*[02468]", r"\d+", lambda v: str(int(v) // 2), lambda v: str(2 * int(v))),
    "param": Field("weight|bias"),
})
_NON_WEIGHTS = re.compile(r"^(pixel_mean|pixel_std|anchor_generator\.cell_anchors\.\d+)$")


def _what_it_is(keys: list[str]) -> str:
    if any(k.startswith("roi_heads.") for k in keys):
        return "a two-stage detector (proposal_generator + roi_heads: Faster/Mask R-CNN)"
    if any("fcos" in k for k in keys):
        return "an FCOS head"
    return f"parts {sorted({'.'.join(k.split('.')[:2]) for k in keys})[:8]}"


def file_name(key: str) -> str:
    """detectron2's name of a torchvision-named parameter (for messages)."""
    return _NAMES.to_file(key)


def rename_state(state: dict, path: Path) -> tuple[dict, dict]:
    """(weights in torchvision names, the non-weight buffers found: pixel_mean/std, cell anchors)."""
    keys = list(state)
    if "head.cls_score.weight" not in state or "head.bbox_pred.weight" not in state:
        raise CheckpointError(f"{path}: not a detectron2 RetinaNet (no head.cls_score / head.bbox_pred): it has "
                              f"{_what_it_is(keys)}")
    buffers = {k: v for k, v in state.items() if _NON_WEIGHTS.match(k)}
    weights = {k: v for k, v in state.items() if k not in buffers}
    return _NAMES.rename(weights, path, suspects="a head with normalisation layers, deformable convs or another "
                         "backbone"), buffers


def detectron2_cell_anchors(level: int) -> torch.Tensor:
    """float32 [9, 4] of one level in detectron2's order: sizes outside, ratios inside, w = size / sqrt(ratio)."""
    rows = []
    for scale in ANCHOR_SCALES:
        size = ANCHOR_SIZES[level] * scale
        for ratio in ASPECT_RATIOS:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows)


def anchor_order() -> list[int]:
    """order[a] = detectron2's anchor index of sadpipe's anchor a = ratio_index * S + scale_index."""
    n_scales, n_ratios = len(ANCHOR_SCALES), len(ASPECT_RATIOS)
    return [s * n_ratios + r for r in range(n_ratios) for s in range(n_scales)]


def _preprocess(buffers: dict, channel_order: str, pixel_mean, pixel_std, sizes: dict,
                path: Path) -> tuple[Preprocess, str]:
    mean, std, how = PIXEL_MEAN_BGR, PIXEL_STD, "detectron2's default PIXEL_MEAN / PIXEL_STD"
    if "pixel_mean" in buffers and "pixel_std" in buffers:
        mean = tuple(float(v) for v in buffers["pixel_mean"].reshape(-1))
        std = tuple(float(v) for v in buffers["pixel_std"].reshape(-1))
        how = "pixel_mean / pixel_std stored in the file"
    if pixel_mean is not None or pixel_std is not None:
        mean = tuple(float(v) for v in pixel_mean) if pixel_mean is not None else mean
        std = tuple(float(v) for v in pixel_std) if pixel_std is not None else std
        how = "pixel mean / std given to the converter"
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{path}: pixel mean {list(mean)} / std {list(std)}: expected 3 values each")
    try:
        return Preprocess(**sizes, image_mean=mean, image_std=std, channel_order=channel_order, pixel_scale=255.0), how
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def convert_detectron2(path: str | Path, *, min_size: int = 800, max_size: int = 1333, pad_divisor: int = 128,
                       categories=None, stride_in_1x1: bool = True, channel_order: str = "BGR",
                       pixel_mean=None, pixel_std=None) -> tuple[Detector, dict]:
    """(Detector computing what detectron2 computes, provenance dict) from a detectron2 ``.pkl`` / ``.pth``.

    ``categories``: COCO ``{"id", "name"}`` dicts of the training dataset (default COCO's 80; the head's
    labels follow their sorted ids, as detectron2's COCO loader makes them). ``stride_in_1x1``,
    ``channel_order``, ``pixel_mean`` and ``pixel_std`` are the model's MODEL.RESNETS.STRIDE_IN_1X1,
    INPUT.FORMAT, MODEL.PIXEL_MEAN and MODEL.PIXEL_STD when they are not detectron2's defaults
    (``pixel_mean`` / ``pixel_std`` default to the file's buffers when it has them).
    """
    path = Path(path)
    payload = read_checkpoint_file(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a detectron2 checkpoint (a {type(payload).__name__}, expected a dict "
                              "with 'model')")
    state = payload.get("model", payload)
    if not isinstance(state, dict) or not any(str(k).startswith("backbone.") for k in state):
        raise CheckpointError(f"{path}: not a detectron2 checkpoint (expected {{'model': {{name: array}}}}; found keys "
                              f"{sorted(map(str, payload))[:8]})")
    state = as_tensor_state(state, path, "model")
    renamed, buffers = rename_state(state, path)
    arch = resnet_arch(renamed, path)
    shape = head_shape(renamed, path, file_name=file_name)
    if shape["anchors_per_cell"] != len(ANCHOR_SCALES) * len(ASPECT_RATIOS):
        raise CheckpointError(f"{path}: the head has {shape['anchors_per_cell']} anchors per cell; detectron2's "
                              "RetinaNet default has 9 (3 sizes x 3 ratios)")
    for level in range(len(STRIDES)):
        stored = buffers.get(f"anchor_generator.cell_anchors.{level}")
        if stored is not None and not torch.allclose(stored.float(), detectron2_cell_anchors(level), atol=1e-3):
            raise CheckpointError(f"{path}: anchor_generator.cell_anchors.{level} are not detectron2's default "
                                  f"RetinaNet anchors (sizes {ANCHOR_SIZES[level]} * 2^(k/3), ratios 0.5/1/2)")
    for key in ("backbone.fpn.inner_blocks.2.0.weight", "backbone.fpn.extra_blocks.p6.weight"):
        if key not in renamed:
            raise CheckpointError(f"{path}: missing key {file_name(key)!r}")
    c5 = renamed["backbone.fpn.inner_blocks.2.0.weight"].shape[1]
    p6_reads = renamed["backbone.fpn.extra_blocks.p6.weight"].shape[1]
    if p6_reads not in (c5, shape["fpn_channels"]):
        raise CheckpointError(f"{path}: backbone.top_block.p6 reads {p6_reads} channels, neither C5 ({c5}) nor P5")
    bottleneck = arch in ("resnet50", "resnet101")
    structure = {"fpn_p6_input": "c5" if p6_reads == c5 else "p5", "fpn_relu_before_p7": True,
                 "stride_in_1x1": bool(stride_in_1x1) and bottleneck}
    sizes = {"min_size": min_size, "max_size": max_size, "pad_divisor": pad_divisor}
    preprocess, normalisation_from = _preprocess(buffers, channel_order, pixel_mean, pixel_std, sizes, path)
    try:
        layout = AnchorLayout(strides=STRIDES, sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS, scales=ANCHOR_SCALES,
                              pad_divisor=pad_divisor, rounded_anchors=False)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    ids, cnames, order, classes_from = categories_for_names(None, shape["num_classes"], path, categories)
    renamed = permute_head_outputs(renamed, anchor_order=anchor_order())
    model = build_converted(renamed, path, arch=arch, num_classes=shape["num_classes"],
                            fpn_channels=shape["fpn_channels"], layout=layout, preprocess=preprocess,
                            structure=structure, category_ids=ids, class_names=cnames, file_name=file_name)
    provenance = {"source": "detectron2", "normalisation": normalisation_from, "classes": classes_from,
                  "anchor_order": "detectron2's (size outer) head channels permuted to torchvision's (ratio outer)"}
    return model, provenance


__all__ = ["convert_detectron2", "rename_state", "file_name", "anchor_order", "detectron2_cell_anchors", "PIXEL_MEAN_BGR"]
