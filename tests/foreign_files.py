"""MMDetection-format checkpoint files made without MMDetection, for the tests that do not need it.

The parameter names are MMDetection's RetinaNet names, written out here key by key (the converter
reads them with its own rules; tests/test_convert_mmdet.py checks those rules against MMDetection).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sadpipe.geometry import AnchorLayout
from sadpipe.models import Detector, default_spec
from sadpipe.transforms import Preprocess


def mmdet_style_model(num_classes: int, *, seed: int = 0, min_size: int = 128, max_size: int = 128,
                      anchor_sizes=(32, 64, 128, 256, 512), fpn_channels: int = 64) -> Detector:
    """A random ResNet-18 RetinaNet with MMDetection's structure (P6 from C5, no ReLU before P7,
    float anchors, ImageNet normalisation), logits spread over the score threshold."""
    layout = AnchorLayout(sizes=tuple(float(s) for s in anchor_sizes), rounded_anchors=False)
    spec = default_spec("resnet18", num_classes, layout, Preprocess(min_size, max_size), fpn_channels=fpn_channels,
                        backbone_norm="frozen_bn", head_norm="none", fpn_p6_input="c5", fpn_relu_before_p7=False)
    torch.manual_seed(seed)
    model = Detector(spec)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-0.2, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("weight"):  # FrozenBatchNorm2d keeps its affine parameters as buffers
                buf.uniform_(0.5, 1.0)
            elif name.endswith("bias"):
                buf.uniform_(-0.1, 0.1)
        for conv in list(model.head.classification_head.conv) + list(model.head.regression_head.conv):
            conv[0].weight.normal_(0, (2 / (9 * fpn_channels)) ** 0.5)
        model.head.classification_head.cls_logits.weight.normal_(0, 0.5 * (1 / (9 * fpn_channels)) ** 0.5)
        model.head.classification_head.cls_logits.bias.uniform_(-4, -2)
        model.head.regression_head.bbox_reg.weight.normal_(0, 0.2 * (1 / (9 * fpn_channels)) ** 0.5)
    return model.eval()


def mmdet_names(state: dict) -> dict:
    """A sadpipe/torchvision RetinaNet state dict under MMDetection's parameter names (+ BN counters)."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.body."):
            new = "backbone." + key[len("backbone.body."):]
        elif m := re.match(r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)$", key):
            new = f"neck.lateral_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)$", key):
            new = f"neck.fpn_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"backbone\.fpn\.extra_blocks\.p([67])\.(\w+)$", key):
            new = f"neck.fpn_convs.{int(m[1]) - 3}.conv.{m[2]}"
        elif m := re.match(r"head\.classification_head\.conv\.(\d)\.0\.(\w+)$", key):
            new = f"bbox_head.cls_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"head\.regression_head\.conv\.(\d)\.0\.(\w+)$", key):
            new = f"bbox_head.reg_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"head\.classification_head\.cls_logits\.(\w+)$", key):
            new = f"bbox_head.retina_cls.{m[1]}"
        elif m := re.match(r"head\.regression_head\.bbox_reg\.(\w+)$", key):
            new = f"bbox_head.retina_reg.{m[1]}"
        else:
            raise KeyError(key)
        out[new] = value.clone()
        if new.startswith("backbone.") and new.endswith("running_var"):
            out[new[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    return out


def write_mmdet_checkpoint(path: Path, model: Detector, classes, **meta) -> Path:
    """``{"state_dict", "meta": {"dataset_meta": {"classes"}, ...}}`` as MMEngine saves it."""
    torch.save({"state_dict": mmdet_names(model.state_dict()),
                "meta": {"dataset_meta": {"classes": tuple(classes)}, **meta}}, path)
    return path


def assert_same_detections(mine: dict, theirs: dict, *, score_tol: float = 1e-5, box_tol: float = 1e-3) -> None:
    """One-to-one: each detection has a counterpart with its label, score and box (pixels) within tolerance.

    Matched as sets, since two scores equal to float precision may come out in either order.
    """
    assert len(mine["scores"]) == len(theirs["scores"])
    unused = list(range(len(theirs["scores"])))
    for box, score, label in zip(mine["boxes"], mine["scores"], mine["labels"]):
        match = next((j for j in unused if theirs["labels"][j] == label and abs(theirs["scores"][j] - score) < score_tol
                      and (theirs["boxes"][j] - box).abs().max() < box_tol), None)
        assert match is not None, f"no counterpart for detection {box.tolist()} {float(score)} {int(label)}"
        unused.remove(match)
