"""The target of every conversion: a sadpipe RetinaNet from a state dict renamed to torchvision's names.

The framework modules (``mmdet``, ``detectron2``) rename keys and read their conventions; this
module does what is common: which ResNet the backbone is, the head's shape (convs, width,
anchors per cell, classes), category ids for class names, the channel permutations that put
anchors and classes in sadpipe's order, and a strict load that names whatever does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..data.coco import COCO80_CATEGORY_IDS
from ..geometry import AnchorLayout
from ..models import CheckpointError, Detector, coco80_class_names, default_spec
from ..transforms import Preprocess

# (blocks per stage, bottleneck?) -> sadpipe arch
_RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
            ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}
HEAD_CONVS = 4  # torchvision's RetinaNetHead has four 3x3 convs per branch


def resnet_arch(state: Mapping[str, torch.Tensor], path: Path) -> str:
    """The sadpipe arch of a backbone in torchvision names (``backbone.body.layer{1..4}.{i}...``)."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"backbone\.body\.layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    bottleneck = any(k.startswith("backbone.body.layer1.0.conv3.") for k in state)
    arch = _RESNETS.get((tuple(blocks), bottleneck))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic-block"
        raise CheckpointError(f"{path}: backbone is a {kind} ResNet with {blocks} blocks per stage; sadpipe converts "
                              "ResNet-18/34/50/101 (2-2-2-2, 3-4-6-3, 3-4-23-3)")
    return arch


def head_shape(state: Mapping[str, torch.Tensor], path: Path, *, file_name: Callable[[str], str]) -> dict:
    """fpn_channels, anchors_per_cell and num_classes read from the renamed state, every width checked.

    ``file_name`` maps a torchvision name back to the file's, for messages.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{path}: missing key {file_name(key)!r}")
        return tuple(state[key].shape)

    ch = shape("backbone.fpn.inner_blocks.0.0.weight")[0]
    for branch in ("classification_head", "regression_head"):
        convs = {int(m.group(1)) for k in state if (m := re.match(rf"head\.{branch}\.conv\.(\d+)\.", k))}
        if convs != set(range(HEAD_CONVS)):
            file_key = re.sub(r"\.\d+\..*$", "", file_name(f"head.{branch}.conv.0.0.weight"))
            raise CheckpointError(f"{path}: head branch {file_key!r} has {len(convs)} convs; "
                                  f"sadpipe's RetinaNet head has {HEAD_CONVS}")
        for i in range(HEAD_CONVS):
            key = f"head.{branch}.conv.{i}.0.weight"
            if shape(key) != (ch, ch, 3, 3):
                raise CheckpointError(f"{path}: {file_name(key)} has shape {list(shape(key))}; sadpipe's head "
                                      f"needs 3x3 convs of the FPN width {ch} ({ch}x{ch}x3x3)")
    box = shape("head.regression_head.bbox_reg.weight")
    cls = shape("head.classification_head.cls_logits.weight")
    if box[1:] != (ch, 3, 3) or box[0] % 4 or cls[1:] != (ch, 3, 3):
        raise CheckpointError(f"{path}: head outputs {list(cls)} (classes) and {list(box)} (boxes) do not fit a "
                              f"RetinaNet head on {ch} FPN channels")
    anchors = box[0] // 4
    if cls[0] % anchors:
        raise CheckpointError(f"{path}: {cls[0]} class channels are not a multiple of the {anchors} anchors per cell")
    return {"fpn_channels": ch, "anchors_per_cell": anchors, "num_classes": cls[0] // anchors}


def _norm_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def categories_for_names(names: Sequence[str] | None, num_classes: int, path: Path,
                         categories: Sequence[Mapping] | None = None) -> tuple[list[int], list[str], list[int], str]:
    """(category_ids sorted, class_names, order, how) for a head whose label k is ``names[k]``.

    ``order[j]`` is the source label that becomes sadpipe label j (sadpipe labels follow sorted
    category ids). ``categories`` (COCO ``{"id", "name"}`` dicts) defaults to COCO's 80. Without
    names, an 80-class head is taken as COCO's 80 in id order (both frameworks' COCO label order).
    """
    if categories is None:
        categories = [{"id": c, "name": n} for c, n in zip(COCO80_CATEGORY_IDS, coco80_class_names())]
        where = "COCO's 80 categories"
    else:
        where = "the given categories"
    by_name = {_norm_name(c["name"]): (int(c["id"]), str(c["name"])) for c in categories}
    if names is None:
        if num_classes != len(categories):
            raise CheckpointError(f"{path}: the file names no classes and its head has {num_classes}, not the "
                                  f"{len(categories)} of {where}; pass categories (a COCO annotation file)")
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        how = f"no class names in the file: assumed {where} in id order"
        return [p[0] for p in pairs], [p[1] for p in pairs], list(range(num_classes)), how
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise CheckpointError(f"{path}: the file names {len(names)} classes but its head has {num_classes}")
    unknown = [n for n in names if _norm_name(n) not in by_name]
    if unknown:
        raise CheckpointError(f"{path}: class names {unknown[:5]} are not in {where}; pass categories "
                              "(a COCO annotation file whose category names are the model's)")
    ids = [by_name[_norm_name(n)][0] for n in names]
    if len(set(ids)) != len(ids):
        raise CheckpointError(f"{path}: class names {names} name a category twice")
    order = sorted(range(num_classes), key=lambda k: ids[k])
    how = f"class names from the file, ids from {where}"
    return [ids[k] for k in order], [by_name[_norm_name(names[k])][1] for k in order], order, how


def permute_head_outputs(state: dict, *, anchor_order: Sequence[int] | None = None,
                         class_order: Sequence[int] | None = None) -> dict:
    """Reorder the output channels of the class and box convs (channel = anchor * width + j).

    New anchor a is source anchor ``anchor_order[a]``; new class j is source class ``class_order[j]``.
    """
    state = dict(state)
    for key_prefix, width in (("head.classification_head.cls_logits", None), ("head.regression_head.bbox_reg", 4)):
        weight = state[f"{key_prefix}.weight"]
        anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4
        width = width or weight.shape[0] // anchors
        a_order = list(anchor_order) if anchor_order is not None else list(range(anchors))
        j_order = list(class_order) if class_order is not None and width != 4 else list(range(width))
        index = torch.tensor([a * width + j for a in a_order for j in j_order])
        for suffix in ("weight", "bias"):
            state[f"{key_prefix}.{suffix}"] = state[f"{key_prefix}.{suffix}"][index].clone()
    return state


def build_converted(state: dict, path: Path, *, arch: str, num_classes: int, fpn_channels: int,
                    layout: AnchorLayout, preprocess: Preprocess, structure: dict, category_ids: list[int],
                    class_names: list[str], file_name: Callable[[str], str]) -> Detector:
    """A Detector with every parameter and buffer from ``state`` (torchvision names); nothing may be left over."""
    spec = default_spec(arch, num_classes, layout, preprocess, fpn_channels=fpn_channels, backbone_norm="frozen_bn",
                        head_norm="none", category_ids=category_ids, class_names=class_names, **structure)
    model = Detector(spec)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    unexpected = [file_name(k) for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit a {arch} RetinaNet: missing "
                              f"{[file_name(k) for k in missing][:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: {file_name(key)} has shape {list(value.shape)}, a {arch} RetinaNet "
                                  f"needs {list(expected[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


__all__ = ["resnet_arch", "head_shape", "categories_for_names", "permute_head_outputs", "build_converted"]
