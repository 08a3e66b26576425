"""RetinaNet detectors with sadpipe's exact geometry, and self-describing checkpoints.

``Detector`` holds a torchvision FPN backbone and a torchvision ``RetinaNetHead`` under the
same attribute names as torchvision's ``RetinaNet`` (``backbone``, ``head``), so plain
torchvision RetinaNet state dicts load into it. Preprocessing and anchors are not inside
the model: they come from ``sadpipe.transforms.Preprocess`` and ``sadpipe.geometry.AnchorLayout``,
both recorded in the checkpoint's ``spec`` so later stages rebuild everything from the file.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .data.coco import COCO80_CATEGORY_IDS, torchvision_coco91_to_80_channels
from .geometry import AnchorLayout
from .transforms import Preprocess

CHECKPOINT_FORMAT = "sadpipe-detector"
CHECKPOINT_VERSION = 1
RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34,
           "resnet50": resnet.resnet50, "resnet101": resnet.resnet101}
TORCHVISION_ARCHS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")
ARCHS = ("tiny",) + tuple(RESNETS) + TORCHVISION_ARCHS


class CheckpointError(ValueError):
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


def default_spec(arch: str, num_classes: int, layout: AnchorLayout, preprocess: Preprocess, **model_cfg) -> dict:
    """The spec dict a checkpoint stores; model_cfg takes the keys of the [*.model] config tables."""
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
    return spec


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


def _build_backbone(spec: dict) -> BackboneWithFPN:
    arch, ch = spec["arch"], spec["fpn_channels"]
    norm = FrozenBatchNorm2d if spec["backbone_norm"] == "frozen_bn" else nn.BatchNorm2d
    if arch == "tiny":
        body = TinyResNet(tuple(spec["tiny_widths"]))
        widths = spec["tiny_widths"]
        return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, list(widths[1:]), ch,
                               extra_blocks=LastLevelP6P7(ch, ch))
    name = "resnet50" if arch in TORCHVISION_ARCHS else arch
    body = RESNETS[name](weights=None, norm_layer=norm)
    if spec["backbone_norm"] == "frozen_bn":
        # as torchvision and the paper when fine-tuning ImageNet weights: stem and layer1 stay frozen
        for pname, param in body.named_parameters():
            if not pname.startswith(("layer2", "layer3", "layer4")):
                param.requires_grad_(False)
    c5 = body.fc.in_features
    in_channels = [c5 // 4, c5 // 2, c5]
    # v2 computes P6 from C5, v1 and ours from P5 (REFERENCE section 3)
    extra = LastLevelP6P7(c5, ch) if arch.endswith("_v2") else LastLevelP6P7(ch, ch)
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, ch, extra_blocks=extra)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "spec": module.spec,
               "model": module.state_dict(), "extra": extra or {}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
                  coco91_to_80: bool = False, map_location="cpu") -> Detector:
    """Rebuild a detector from a sadpipe checkpoint, or from a plain torchvision RetinaNet state dict.

    A plain state dict needs ``arch`` (retinanet_resnet50_fpn or retinanet_resnet50_fpn_v2, or a sadpipe
    arch) and ``num_classes``; geometry defaults to torchvision's (anchor sizes 32..512, 800/1333).
    ``coco91_to_80`` maps a 91-channel torchvision COCO head to the 80 COCO categories.
    """
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
        raise CheckpointError(f"{path}: neither a sadpipe checkpoint nor a RetinaNet state dict")
    if arch is None or num_classes is None:
        raise CheckpointError(f"{path} is a plain state dict: pass arch (e.g. retinanet_resnet50_fpn) and num_classes")
    layout = layout or AnchorLayout()
    preprocess = preprocess or Preprocess(min_size=800, max_size=1333)
    if coco91_to_80:
        state = _map_coco91_to_80(state, layout.anchors_per_cell)
        # torchvision's weight metadata lists the 91 channel names (no download involved)
        from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights
        names91 = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
        names_ids = {"category_ids": list(COCO80_CATEGORY_IDS), "class_names": [names91[c] for c in COCO80_CATEGORY_IDS]}
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


__all__ = ["ARCHS", "Detector", "CheckpointError", "build_detector", "default_spec", "load_detector",
           "save_checkpoint", "file_sha256", "count_parameters", "COCO80_CATEGORY_IDS"]
