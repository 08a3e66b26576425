"""RetinaNet detectors with sadpipe's exact geometry, and self-describing checkpoints.

``Detector`` holds a torchvision FPN backbone and a torchvision ``RetinaNetHead`` under the
same attribute names as torchvision's ``RetinaNet`` (``backbone``, ``head``), so plain
torchvision RetinaNet state dicts load into it. Preprocessing and anchors are not inside
the model: they come from ``sadpipe.transforms.Preprocess`` and ``sadpipe.geometry.AnchorLayout``,
both recorded in the checkpoint's ``spec`` so later stages rebuild everything from the file.

Teachers converted from MMDetection or detectron2 (``sadpipe.convert``) need three structural
options, stored in the spec only when they differ from the arch's default (so older specs are
unchanged): ``fpn_p6_input`` ("p5" or "c5": which map P6's conv reads), ``fpn_relu_before_p7``
(torchvision and detectron2 apply a ReLU to P6 before P7's conv, MMDetection does not) and
``stride_in_1x1`` (detectron2's MSRA-style bottleneck strides in its first 1x1 conv, torchvision
in the 3x3). Parameter names stay torchvision's, so the state dict layout is the same.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .engine.run_state import atomic_save
from .errors import UserError
from .data.coco import COCO80_CATEGORY_IDS, torchvision_coco91_to_80_channels
from .geometry import AnchorLayout
from .transforms import Preprocess

CHECKPOINT_FORMAT = "sadpipe-detector"
CHECKPOINT_VERSION = 1
RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34,
           "resnet50": resnet.resnet50, "resnet101": resnet.resnet101}
TORCHVISION_ARCHS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")
ARCHS = ("tiny",) + tuple(RESNETS) + TORCHVISION_ARCHS


class CheckpointError(UserError, ValueError):
    pass


class TinyResNet(nn.Module):
    """A narrow ResNet (one BasicBlock per stage) for CPU demos and tests. Returns C2..C5 via children."""

    def __init__(self, widths=(32, 64, 128, 256)):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], w0
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and cin == w else nn.Sequential(
                nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(resnet.BasicBlock(cin, w, stride, down))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x):  # pragma: no cover - IntermediateLayerGetter walks the children instead
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _head_norm(kind: str, channels: int):
    if kind == "none":
        return None
    if kind == "group":
        return partial(nn.GroupNorm, 32 if channels >= 256 else 8)
    raise CheckpointError(f"unknown head_norm {kind!r}: use 'group' or 'none'")


def _arch_structure_defaults(arch: str) -> dict:
    """The structural options an arch has when its spec does not name them."""
    return {"fpn_p6_input": "c5" if arch.endswith("_v2") else "p5", "fpn_relu_before_p7": True,
            "stride_in_1x1": False}


def _structure_options(arch: str, model_cfg: dict) -> dict:
    """The structural options of model_cfg that differ from the arch's defaults (checked)."""
    defaults = _arch_structure_defaults(arch)
    chosen = {k: model_cfg.get(k, v) for k, v in defaults.items()}
    if chosen["fpn_p6_input"] not in ("p5", "c5"):
        raise CheckpointError(f"fpn_p6_input {chosen['fpn_p6_input']!r}: use 'p5' or 'c5'")
    for key in ("fpn_relu_before_p7", "stride_in_1x1"):
        if not isinstance(chosen[key], bool):
            raise CheckpointError(f"{key} must be true or false, got {chosen[key]!r}")
    options = {k: v for k, v in chosen.items() if v != defaults[k]}
    if options and arch in TORCHVISION_ARCHS:
        raise CheckpointError(f"{arch} is exactly torchvision's structure; use arch resnet50 for {options}")
    if chosen["stride_in_1x1"] and arch not in ("resnet50", "resnet101"):
        raise CheckpointError(f"stride_in_1x1 needs a bottleneck ResNet (resnet50, resnet101), not {arch}")
    return options


def default_spec(arch: str, num_classes: int, layout: AnchorLayout, preprocess: Preprocess, **model_cfg) -> dict:
    """The spec dict a checkpoint stores; model_cfg takes the keys of the [*.model] config tables,
    plus the structural options fpn_p6_input, fpn_relu_before_p7 and stride_in_1x1 (module docstring)."""
    if arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    spec = {
        "arch": arch, "num_classes": int(num_classes),
        "fpn_channels": int(model_cfg.get("fpn_channels", 256)),
        "tiny_widths": list(model_cfg.get("tiny_widths", [32, 64, 128, 256])),
        "backbone_norm": model_cfg.get("backbone_norm", "bn"),
        "head_norm": model_cfg.get("head_norm", "group"),
        "layout": layout.to_dict(), "preprocess": preprocess.to_dict(),
        "category_ids": list(model_cfg.get("category_ids") or range(1, num_classes + 1)),
        "class_names": list(model_cfg.get("class_names") or [f"class_{i}" for i in range(num_classes)]),
    }
    if arch in TORCHVISION_ARCHS:
        # exactly torchvision's structure so its checkpoints load
        spec.update(fpn_channels=256, backbone_norm="frozen_bn",
                    head_norm="group" if arch.endswith("_v2") else "none")
    spec.update(_structure_options(arch, model_cfg))
    return spec


def model_spec(model_cfg, num_classes: int, layout: AnchorLayout, preprocess: Preprocess, *,
               category_ids=None, class_names=None) -> dict:
    """The spec of a model described by a ``settings.ModelConfig`` (a [*.model] table)."""
    return default_spec(model_cfg.arch, num_classes, layout, preprocess, fpn_channels=model_cfg.fpn_channels,
                        tiny_widths=list(model_cfg.tiny_widths), backbone_norm=model_cfg.backbone_norm,
                        head_norm=model_cfg.head_norm, category_ids=category_ids, class_names=class_names)


class Detector(nn.Module):
    """RetinaNet: images float32 [B, 3, H, W] (H, W multiples of the pad divisor) ->
    (cls_logits float32 [B, A, K], bbox_regression float32 [B, A, 4]) in head anchor order."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        self.layout = AnchorLayout.from_dict(spec["layout"])
        self.preprocess = Preprocess.from_dict(spec["preprocess"])
        self.backbone = _build_backbone(spec)
        self.head = RetinaNetHead(self.backbone.out_channels, self.layout.anchors_per_cell, spec["num_classes"],
                                  norm_layer=_head_norm(spec["head_norm"], self.backbone.out_channels))

    @property
    def num_classes(self) -> int:
        return self.spec["num_classes"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = list(self.backbone(images).values())
        if len(features) != self.layout.num_levels:
            raise RuntimeError(f"backbone gives {len(features)} levels, layout expects {self.layout.num_levels}")
        out = self.head(features)
        return out["cls_logits"], out["bbox_regression"]


class PyramidTop(LastLevelP6P7):
    """torchvision's P6/P7 block (same parameters ``p6``, ``p7``) with the input of P6 and the ReLU
    before P7 chosen explicitly: MMDetection's RetinaNet takes P6 from C5 and has no ReLU there."""

    def __init__(self, in_channels: int, out_channels: int, *, from_c5: bool, relu_before_p7: bool):
        super().__init__(in_channels, out_channels)
        self.use_P5 = not from_c5
        self.relu_before_p7 = relu_before_p7

    def forward(self, p, c, names):
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return p + [p6, p7], names + ["p6", "p7"]


def _pyramid_top(spec: dict, c5: int, ch: int) -> LastLevelP6P7:
    default_input = _arch_structure_defaults(spec["arch"])["fpn_p6_input"]
    from_c5 = spec.get("fpn_p6_input", default_input) == "c5"
    relu = spec.get("fpn_relu_before_p7", True)
    if relu and from_c5 == (default_input == "c5"):
        # the block each arch always had (LastLevelP6P7 itself reads P5 when its in and out widths agree)
        return LastLevelP6P7(c5 if from_c5 else ch, ch)
    return PyramidTop(c5 if from_c5 else ch, ch, from_c5=from_c5, relu_before_p7=relu)


def _stride_in_1x1(body: nn.Module) -> None:
    """Move the stride-2 of each stage's first bottleneck from its 3x3 conv to its 1x1 conv (MSRA ResNet)."""
    for layer in (body.layer2, body.layer3, body.layer4):
        block = layer[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _build_backbone(spec: dict) -> BackboneWithFPN:
    arch, ch = spec["arch"], spec["fpn_channels"]
    norm = FrozenBatchNorm2d if spec["backbone_norm"] == "frozen_bn" else nn.BatchNorm2d
    if arch == "tiny":
        body = TinyResNet(tuple(spec["tiny_widths"]))
        widths = spec["tiny_widths"]
        return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, list(widths[1:]), ch,
                               extra_blocks=_pyramid_top(spec, widths[-1], ch))
    name = "resnet50" if arch in TORCHVISION_ARCHS else arch
    body = RESNETS[name](weights=None, norm_layer=norm)
    if spec["backbone_norm"] == "frozen_bn":
        # as torchvision and the paper when fine-tuning ImageNet weights: stem and layer1 stay frozen
        for pname, param in body.named_parameters():
            if not pname.startswith(("layer2", "layer3", "layer4")):
                param.requires_grad_(False)
    if spec.get("stride_in_1x1", False):
        _stride_in_1x1(body)
    c5 = body.fc.in_features
    in_channels = [c5 // 4, c5 // 2, c5]
    # v2 computes P6 from C5, v1 and ours from P5 (torchvision's retinanet_resnet50_fpn[_v2] builders)
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, ch,
                           extra_blocks=_pyramid_top(spec, c5, ch))


def build_detector(spec: dict, backbone_weights: str | Path | None = None) -> Detector:
    """A freshly initialised detector; optional ImageNet backbone weights from a local file."""
    model = Detector(spec)
    if backbone_weights:
        path = Path(backbone_weights)
        if not path.is_file():
            raise CheckpointError(f"backbone weights file not found: {path} (set model.backbone_weights to a local "
                                  "torchvision ImageNet state dict, or leave it empty to train from scratch)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.backbone.body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(f"{path}: backbone weights do not fit arch {spec['arch']}: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    return model


def save_checkpoint(path: str | Path, model: Detector, extra: dict | None = None) -> Path:
    """Write a self-describing checkpoint atomically (temp file + rename)."""
    path = Path(path)
    module = model.module if hasattr(model, "module") else model
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "spec": module.spec,
               "model": module.state_dict(), "extra": extra or {}}
    atomic_save(payload, path)
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def coco80_class_names() -> list[str]:
    """The names of COCO80_CATEGORY_IDS, in that order (from torchvision's 91-slot list; no download)."""
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights
    names91 = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [names91[c] for c in COCO80_CATEGORY_IDS]


def _map_coco91_to_80(state: dict, num_anchors: int) -> dict:
    """Keep the 80 used COCO channels of a 91-channel torchvision head (channel index = a * K + k)."""
    channels = torchvision_coco91_to_80_channels(COCO80_CATEGORY_IDS)
    keep = torch.tensor([a * 91 + c for a in range(num_anchors) for c in channels])
    state = dict(state)
    for key in ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"):
        state[key] = state[key][keep]
    return state


def load_detector(path: str | Path, arch: str | None = None, num_classes: int | None = None, *,
                  layout: AnchorLayout | None = None, preprocess: Preprocess | None = None,
                  coco91_to_80: bool = False, map_location="cpu", source: str | None = None,
                  **convert_options) -> Detector:
    """Rebuild a detector from a sadpipe checkpoint, or from a plain torchvision RetinaNet state dict,
    or convert an MMDetection / detectron2 RetinaNet checkpoint (``source="mmdet"`` / ``"detectron2"``).

    A plain state dict needs ``arch`` (retinanet_resnet50_fpn or retinanet_resnet50_fpn_v2, or a sadpipe
    arch) and ``num_classes``; geometry defaults to torchvision's (anchor sizes 32..512, 800/1333).
    ``coco91_to_80`` maps a 91-channel torchvision COCO head to the 80 COCO categories.
    A foreign checkpoint brings its own architecture, anchors and normalisation; ``convert_options``
    go to ``sadpipe.convert.convert_checkpoint`` (min_size, max_size, pad_divisor, categories).
    """
    if source not in (None, "sadpipe", "torchvision"):
        if arch is not None or num_classes is not None or layout is not None or preprocess is not None or coco91_to_80:
            raise CheckpointError(f"a {source} checkpoint describes its own architecture, classes, anchors and "
                                  "normalisation: pass only min_size, max_size, pad_divisor or categories")
        from .convert import convert_checkpoint
        return convert_checkpoint(path, source, **convert_options)
    if convert_options:
        raise CheckpointError(f"options {sorted(convert_options)} apply only to source='mmdet' or 'detectron2'")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        if payload.get("version", 0) > CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: checkpoint version {payload['version']} is newer than this sadpipe; upgrade")
        model = Detector(payload["spec"])
        model.load_state_dict(payload["model"])
        return model
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("head.") for k in state):
        hint = ""
        if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
            hint = " (it has a 'state_dict': an MMDetection checkpoint? use source='mmdet' / --from mmdet)"
        elif isinstance(state, dict) and any(str(k).startswith("backbone.bottom_up.") for k in state):
            hint = " (detectron2 parameter names: use source='detectron2' / --from detectron2)"
        raise CheckpointError(f"{path}: neither a sadpipe checkpoint nor a RetinaNet state dict{hint}")
    if arch is None or num_classes is None:
        raise CheckpointError(f"{path} is a plain state dict: pass arch (e.g. retinanet_resnet50_fpn) and num_classes")
    layout = layout or AnchorLayout()
    preprocess = preprocess or Preprocess(min_size=800, max_size=1333)
    if coco91_to_80:
        state = _map_coco91_to_80(state, layout.anchors_per_cell)
        names_ids = {"category_ids": list(COCO80_CATEGORY_IDS), "class_names": coco80_class_names()}
        num_classes = 80
    else:
        names_ids = {}
    spec = default_spec(arch, num_classes, layout, preprocess, **names_ids)
    model = Detector(spec)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: wrong arch or num_classes is a user error, not a bug
        raise CheckpointError(f"{path}: state dict does not fit arch {arch} with {num_classes} classes: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not fit arch {arch} with {num_classes} classes: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHS", "Detector", "CheckpointError", "build_detector", "default_spec", "model_spec", "load_detector",
           "save_checkpoint", "file_sha256", "count_parameters", "COCO80_CATEGORY_IDS", "coco80_class_names",
           "PyramidTop"]
