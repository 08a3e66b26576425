"""MMDetection RetinaNet checkpoints (2.x and 3.x) -> sadpipe Detector.

An MMDetection checkpoint is ``{"state_dict": {name: tensor}, "meta": {...}}``. The class names are
in ``meta["dataset_meta"]["classes"]`` (3.x) or ``meta["CLASSES"]`` (2.x); the config text the
model was trained with, when the file has it (``meta["cfg"]`` in 3.x, ``meta["config"]`` in 2.x),
is read without executing it (``ast``: only literal ``dict(...)``/list/number/string expressions)
for the anchor generator, box coder, FPN options, backbone style and normalisation. Without a
config the zoo's RetinaNet settings are assumed (``configs/_base_/models/retinanet_r50_fpn.py``).

Conventions matched (each checked against MMDetection 3.3.0 itself in tests/test_convert_mmdet.py):

- parameters: ``backbone.*`` is torchvision's ResNet naming; the FPN's ``lateral_convs.i.conv`` /
  ``fpn_convs.i.conv`` are torchvision's ``inner_blocks.i.0`` / ``layer_blocks.i.0``, ``fpn_convs.3``
  and ``.4`` are P6 and P7; the head's ``cls_convs.i.conv``, ``retina_cls`` ... are torchvision's
  ``classification_head.conv.i.0``, ``cls_logits`` ...; output channel = anchor * width + j in both.
- FPN: ``add_extra_convs='on_input'``: P6 from C5; ``relu_before_extra_convs`` False: no ReLU
  before P7 (torchvision has one).
- anchors: ``AnchorGenerator`` with ratio outer, scale inner (torchvision's order), sizes
  ``stride * octave_base_scale * 2^(i / scales_per_octave)``, float corners (not rounded),
  centre offset 0.
- input: pytorch style is RGB with the ImageNet mean/std on 0-255, identical to sadpipe's default
  preprocessing on 0-1; caffe style (stride in the 1x1 conv) takes BGR 0-255 with std 1, read from
  the config.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

from ..geometry import AnchorLayout
from ..models import CheckpointError, Detector
from ..transforms import Preprocess
from .files import as_tensor_state, read_checkpoint_file
from .names import Field, NameMap
from .retinanet import build_converted, categories_for_names, head_shape, permute_head_outputs, resnet_arch

# the zoo's RetinaNet (configs/_base_/models/retinanet_r50_fpn.py), used when the file has no config
ZOO_RETINANET = {
    "backbone": {"style": "pytorch"},
    "neck": {"start_level": 1, "add_extra_convs": "on_input", "relu_before_extra_convs": False, "num_outs": 5},
    "anchor_generator": {"octave_base_scale": 4, "scales_per_octave": 3, "ratios": [0.5, 1.0, 2.0],
                         "strides": [8, 16, 32, 64, 128], "center_offset": 0.0},
    "bbox_coder": {"target_means": [0.0, 0.0, 0.0, 0.0], "target_stds": [1.0, 1.0, 1.0, 1.0]},
    "normalisation": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True},
}


# ---------------------------------------------------------------------------- reading the config text

class _NotLiteral(Exception):
    pass


def _literal(node: ast.AST):
    """The value of a literal expression, ``dict(k=v, ...)`` calls included; anything else raises _NotLiteral."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    raise _NotLiteral(ast.dump(node)[:60])


def read_config_text(text: str) -> dict:
    """Top-level ``name = literal`` assignments of an MMEngine/mmcv config dump; other statements are skipped."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return {}
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = _literal(stmt.value)
            except _NotLiteral:
                continue
    return out


def _config_settings(meta: dict, path: Path) -> tuple[dict, str]:
    """The conventions this converter needs, from the file's config where it has one, else the zoo's."""
    settings = {k: dict(v) for k, v in ZOO_RETINANET.items()}
    text = meta.get("cfg") or meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        return settings, "no config in the file: the zoo's RetinaNet settings assumed"
    cfg = read_config_text(text)
    model = cfg.get("model")
    if not isinstance(model, dict):
        return settings, "config in the file has no literal model dict: the zoo's RetinaNet settings assumed"
    kind = model.get("type")
    head = model.get("bbox_head") if isinstance(model.get("bbox_head"), dict) else {}
    if kind not in (None, "RetinaNet") or head.get("type") not in (None, "RetinaHead"):
        raise CheckpointError(f"{path}: the file's config is a {kind} with a {head.get('type')}; sadpipe converts "
                              "RetinaNet with RetinaHead")
    for section, source in (("backbone", model.get("backbone")), ("neck", model.get("neck")),
                            ("anchor_generator", head.get("anchor_generator")), ("bbox_coder", head.get("bbox_coder"))):
        if isinstance(source, dict):
            settings[section].update({k: v for k, v in source.items() if k in settings[section] or k in
                                      ("type", "scales", "base_sizes", "depth", "extra_convs_on_inputs")})
    norm = model.get("data_preprocessor") if isinstance(model.get("data_preprocessor"), dict) else None
    if norm is not None and "mean" in norm:  # 3.x
        settings["normalisation"] = {"mean": norm["mean"], "std": norm["std"], "to_rgb": bool(norm.get("bgr_to_rgb"))}
    elif isinstance(cfg.get("img_norm_cfg"), dict):  # 2.x
        n = cfg["img_norm_cfg"]
        settings["normalisation"] = {"mean": n["mean"], "std": n["std"], "to_rgb": bool(n.get("to_rgb", True))}
    return settings, "settings from the file's config"


def _layout(anchor: dict, pad_divisor: int, path: Path) -> AnchorLayout:
    if anchor.get("type", "AnchorGenerator") != "AnchorGenerator" or float(anchor.get("center_offset", 0.0)) != 0.0:
        raise CheckpointError(f"{path}: anchor generator {anchor}; sadpipe's anchors are MMDetection's "
                              "AnchorGenerator with center_offset 0")
    strides = [int(s[0] if isinstance(s, list) else s) for s in anchor["strides"]]
    base = [float(b) for b in anchor.get("base_sizes") or strides]
    if anchor.get("scales"):
        scales = [float(s) for s in anchor["scales"]]
        sizes = base
    else:
        octave, per_octave = float(anchor["octave_base_scale"]), int(anchor["scales_per_octave"])
        # factor the octave base into the size so scales are 2^(i/n) like torchvision's: same products
        scales = [2 ** (i / per_octave) for i in range(per_octave)]
        sizes = [b * octave for b in base]
    try:
        return AnchorLayout(strides=tuple(strides), sizes=tuple(sizes), scales=tuple(scales),
                            aspect_ratios=tuple(float(r) for r in anchor["ratios"]), pad_divisor=pad_divisor,
                            rounded_anchors=False)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _preprocess(norm: dict, sizes: dict) -> Preprocess:
    mean, std = [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]
    if norm["to_rgb"]:
        # RGB on 0-255 with mean m, std s is RGB on 0-1 with m / 255, s / 255: the zoo's numbers give
        # exactly torchvision's ImageNet defaults (123.675 / 255 = 0.485, 58.395 / 255 = 0.229, ...)
        default = Preprocess(**sizes)
        if all(math.isclose(m / 255, d, abs_tol=1e-9) for m, d in zip(mean, default.image_mean)) and \
                all(math.isclose(s / 255, d, abs_tol=1e-9) for s, d in zip(std, default.image_std)):
            return default
        return Preprocess(**sizes, image_mean=tuple(mean), image_std=tuple(std), pixel_scale=255.0)
    return Preprocess(**sizes, image_mean=tuple(mean), image_std=tuple(std), channel_order="BGR", pixel_scale=255.0)


# ---------------------------------------------------------------------------- parameter names

# (MMDetection name, torchvision name); ResNet parameters keep their names below backbone.body
_NAMES = NameMap([
    ("backbone.{resnet}", "backbone.body.{resnet}"),
    ("neck.lateral_convs.{level}.conv.{param}", "backbone.fpn.inner_blocks.{level}.0.{param}"),
    ("neck.fpn_convs.{level}.conv.{param}", "backbone.fpn.layer_blocks.{level}.0.{param}"),
    ("neck.fpn_convs.3.conv.{param}", "backbone.fpn.extra_blocks.p6.{param}"),
    ("neck.fpn_convs.4.conv.{param}", "backbone.fpn.extra_blocks.p7.{param}"),
    ("bbox_head.cls_convs.{conv}.conv.{param}", "head.classification_head.conv.{conv}.0.{param}"),
    ("bbox_head.reg_convs.{conv}.conv.{param}", "head.regression_head.conv.{conv}.0.{param}"),
    ("bbox_head.retina_cls.{param}", "head.classification_head.cls_logits.{param}"),
    ("bbox_head.retina_reg.{param}", "head.regression_head.bbox_reg.{param}"),
], {
    "resnet": Field(r"(?:conv1|bn1|layer[1-4])\..+"),
    "level": Field("[0-2]"),  # the FPN levels fed by ResNet stages (P3..P5)
    "conv": Field(r"\d+"),
    "param": Field("weight|bias"),
})

# top-level parts and head parameters that tell what another kind of detector is
_OTHER_KINDS = [("roi_head.", "a two-stage detector (Faster/Mask R-CNN: rpn_head + roi_head)"),
                ("rpn_head.", "a two-stage detector (rpn_head)"),
                ("bbox_head.conv_centerness", "an FCOS head (conv_centerness)"),
                ("bbox_head.conv_cls", "an FCOS-style head (conv_cls)"),
                ("bbox_head.atss_cls", "an ATSS head (atss_cls)"),
                ("bbox_head.gfl_cls", "a GFL head (gfl_cls)")]


def _what_it_is(keys: list[str]) -> str:
    for prefix, kind in _OTHER_KINDS:
        if any(k.startswith(prefix) for k in keys):
            return kind
    parts = sorted({".".join(k.split(".")[:2]) for k in keys if k.startswith("bbox_head.")}) or \
        sorted({k.split(".")[0] for k in keys})
    return f"parts {parts[:8]}"


def file_name(key: str) -> str:
    """MMDetection's name of a torchvision-named parameter (for messages)."""
    return _NAMES.to_file(key)


def rename_state(state: dict, path: Path) -> dict:
    """The state in torchvision names; unknown keys are refused, named."""
    keys = list(state)
    if "bbox_head.retina_cls.weight" not in state or "bbox_head.retina_reg.weight" not in state:
        raise CheckpointError(f"{path}: not a RetinaNet (no bbox_head.retina_cls / retina_reg): it has "
                              f"{_what_it_is(keys)}")
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # BatchNorm step counts
    return _NAMES.rename(weights, path, suspects="a head with normalisation layers, deformable convs or another neck")


# ---------------------------------------------------------------------------- the conversion

def class_names(meta: dict) -> list[str] | None:
    """The class names an MMDetection checkpoint records (3.x dataset_meta, 2.x CLASSES), or None."""
    if not isinstance(meta, dict):
        return None
    dataset_meta = meta.get("dataset_meta")
    if isinstance(dataset_meta, dict) and dataset_meta.get("classes") is not None:
        return [str(c) for c in dataset_meta["classes"]]
    if meta.get("CLASSES") is not None:
        return [str(c) for c in meta["CLASSES"]]
    return None


def convert_mmdet(path: str | Path, *, min_size: int = 800, max_size: int = 1333, pad_divisor: int = 128,
                  categories=None) -> tuple[Detector, dict]:
    """(Detector computing what MMDetection computes, provenance dict) from an MMDetection checkpoint file.

    min_size / max_size / pad_divisor are sadpipe's resize (MMDetection's test scale is 1333x800);
    ``categories``: COCO ``{"id", "name"}`` dicts for non-COCO class names (default COCO's 80).
    """
    path = Path(path)
    payload = read_checkpoint_file(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        found = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an MMDetection checkpoint (expected a dict with 'state_dict' and "
                              f"'meta'; found {found})")
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    state = as_tensor_state(payload["state_dict"], path, "state_dict")
    settings, settings_from = _config_settings(meta, path)
    renamed = rename_state(state, path)

    backbone, neck = settings["backbone"], settings["neck"]
    arch = resnet_arch(renamed, path)
    if backbone.get("depth") is not None and f"resnet{backbone['depth']}" != arch:
        raise CheckpointError(f"{path}: config says ResNet-{backbone['depth']}, the weights are a {arch}")
    style = backbone.get("style", "pytorch")
    if style not in ("pytorch", "caffe"):
        raise CheckpointError(f"{path}: backbone style {style!r}; expected 'pytorch' or 'caffe'")
    if neck.get("type", "FPN") != "FPN":
        raise CheckpointError(f"{path}: neck {neck.get('type')}; sadpipe converts RetinaNet with an FPN")
    if (neck.get("start_level"), neck.get("num_outs")) != (1, 5):
        raise CheckpointError(f"{path}: FPN start_level {neck.get('start_level')}, num_outs {neck.get('num_outs')}; "
                              "sadpipe's RetinaNet uses C3-C5 and five levels P3-P7 (1, 5)")
    extra = neck.get("add_extra_convs")
    if extra is True:  # early 2.x configs: a flag, and where in extra_convs_on_inputs
        extra = "on_input" if neck.get("extra_convs_on_inputs", True) else "on_output"
    if extra not in ("on_input", "on_output"):
        raise CheckpointError(f"{path}: FPN add_extra_convs={extra!r}; sadpipe converts 'on_input' (P6 from C5) "
                              "and 'on_output' (P6 from P5)")
    p6_input = "c5" if extra == "on_input" else "p5"
    structure = {"fpn_p6_input": p6_input, "fpn_relu_before_p7": bool(neck.get("relu_before_extra_convs", False)),
                 "stride_in_1x1": style == "caffe" and arch in ("resnet50", "resnet101")}
    shape = head_shape(renamed, path, file_name=file_name)
    for key in ("backbone.fpn.inner_blocks.2.0.weight", "backbone.fpn.extra_blocks.p6.weight"):
        if key not in renamed:
            raise CheckpointError(f"{path}: missing key {file_name(key)!r}")
    c5 = renamed["backbone.fpn.inner_blocks.2.0.weight"].shape[1]
    p6_reads = renamed["backbone.fpn.extra_blocks.p6.weight"].shape[1]
    if p6_reads != (c5 if p6_input == "c5" else shape["fpn_channels"]):
        raise CheckpointError(f"{path}: neck.fpn_convs.3 (P6) reads {p6_reads} channels, C5 has {c5}: that is not "
                              f"add_extra_convs={extra!r}")
    coder = settings["bbox_coder"]
    if coder.get("type", "DeltaXYWHBBoxCoder") != "DeltaXYWHBBoxCoder" or \
            [float(v) for v in coder["target_means"]] != [0.0] * 4 or [float(v) for v in coder["target_stds"]] != [1.0] * 4:
        raise CheckpointError(f"{path}: box coder {coder}; sadpipe decodes deltas with means 0 and stds 1")
    layout = _layout(settings["anchor_generator"], pad_divisor, path)
    if layout.anchors_per_cell != shape["anchors_per_cell"] or layout.num_levels != 5:
        raise CheckpointError(f"{path}: the head has {shape['anchors_per_cell']} anchors per cell, the anchor "
                              f"generator {layout.anchors_per_cell} on {layout.num_levels} levels")
    try:
        preprocess = _preprocess(settings["normalisation"],
                                 {"min_size": min_size, "max_size": max_size, "pad_divisor": pad_divisor})
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    ids, cnames, order, classes_from = categories_for_names(class_names(meta), shape["num_classes"], path, categories)
    if order != list(range(len(order))):
        renamed = permute_head_outputs(renamed, class_order=order)
    model = build_converted(renamed, path, arch=arch, num_classes=shape["num_classes"],
                            fpn_channels=shape["fpn_channels"], layout=layout, preprocess=preprocess,
                            structure=structure, category_ids=ids, class_names=cnames, file_name=file_name)
    provenance = {"source": "mmdet", "settings": settings_from, "classes": classes_from, "style": style}
    return model, provenance


__all__ = ["convert_mmdet", "class_names", "read_config_text", "rename_state", "file_name", "ZOO_RETINANET"]
