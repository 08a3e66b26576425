"""Teachers from other frameworks: MMDetection and detectron2 RetinaNet checkpoints as sadpipe detectors.

``convert_checkpoint(path, "mmdet" | "detectron2")`` gives a ``Detector`` whose spec records every
convention of the source framework (anchors, normalisation, FPN and backbone details), so it saves
as an ordinary self-describing sadpipe checkpoint. See docs/teachers.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models import CheckpointError, Detector

FOREIGN_SOURCES = ("mmdet", "detectron2")
SOURCES = ("torchvision",) + FOREIGN_SOURCES


def convert_checkpoint(path: str | Path, source: str, **options) -> Detector:
    """The converted Detector (eval mode); ``options``: min_size, max_size, pad_divisor, categories
    (and for detectron2 stride_in_1x1, channel_order)."""
    return convert_with_provenance(path, source, **options)[0]


def convert_with_provenance(path: str | Path, source: str, **options) -> tuple[Detector, dict]:
    """(Detector, what was read from the file and what was assumed) for the checkpoint's ``extra``."""
    if source == "mmdet":
        from .mmdet import convert_mmdet
        return convert_mmdet(path, **options)
    if source == "detectron2":
        from .detectron2 import convert_detectron2
        return convert_detectron2(path, **options)
    raise CheckpointError(f"unknown checkpoint source {source!r}; choose one of {', '.join(FOREIGN_SOURCES)}")


def geometry_table(model: Detector) -> dict:
    """The [geometry] config table whose ``geometry_from_config`` is exactly the model's layout and preprocessing."""
    layout, pre = model.layout, model.preprocess
    return {"min_size": pre.min_size, "max_size": pre.max_size, "pad_divisor": pre.pad_divisor,
            "strides": list(layout.strides), "anchor_sizes": [float(s) for s in layout.sizes],
            "aspect_ratios": [float(r) for r in layout.aspect_ratios], "scales": [float(s) for s in layout.scales],
            "image_mean": [float(m) for m in pre.image_mean], "image_std": [float(s) for s in pre.image_std],
            "rounded_anchors": layout.rounded_anchors, "channel_order": pre.channel_order,
            "pixel_scale": float(pre.pixel_scale)}


def geometry_settings(model: Detector) -> str:
    """``geometry_table`` as TOML text, to paste into a pipeline file (floats in their exact shortest repr)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)
    return "\n".join(["[geometry]"] + [f"{k} = {value(v)}" for k, v in geometry_table(model).items()])


def categories_from_file(path: str | Path) -> list[dict]:
    """The ``categories`` list ({"id", "name"}) of a COCO annotation file, for models of other datasets."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]]
    except FileNotFoundError:
        raise CheckpointError(f"categories file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a COCO annotation file with a 'categories' list of {{id, name}} "
                              f"({type(e).__name__}: {e})") from None
    if not categories:
        raise CheckpointError(f"{path}: 'categories' is empty")
    return categories


__all__ = ["SOURCES", "FOREIGN_SOURCES", "convert_checkpoint", "convert_with_provenance", "categories_from_file",
           "geometry_table", "geometry_settings"]
