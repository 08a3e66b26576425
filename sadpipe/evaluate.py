"""COCO box metrics with pycocotools, and a small text table for comparing runs.

Metric values are floats in [0, 1]. Where pycocotools reports -1 ("no ground
truth in this area range / at all") this module returns ``float('nan')``: the
metric is undefined, and NaN cannot be silently averaged into a number the way
-1 can. ``format_metrics_table`` prints NaN as "-".
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from .errors import MissingInputError

__all__ = ["METRIC_NAMES", "coco_evaluate", "detections_to_coco", "format_metrics_table", "load_coco_gt"]

# Order of the first six entries of COCOeval.stats for iouType "bbox".
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet(verbose: bool):
    """Context manager that swallows pycocotools' prints unless verbose."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def load_coco_gt(gt: str | os.PathLike | COCO, *, verbose: bool = False) -> COCO:
    """A pycocotools ``COCO`` from an instances JSON path, or the object itself."""
    if isinstance(gt, COCO):
        return gt
    path = os.fspath(gt)
    if not os.path.isfile(path):
        raise MissingInputError(f"COCO ground-truth file {path!r} does not exist; pass an instances_*.json path")
    with _quiet(verbose):
        return COCO(path)


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (pycocotools' loadRes fails on [])."""
    results = COCO()
    results.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with _quiet(False):
        results.createIndex()
    return results


def coco_evaluate(
    gt: str | os.PathLike | COCO,
    detections: Sequence[Mapping],
    image_ids: Iterable[int] | None = None,
    *,
    verbose: bool = False,
    per_iou: bool = False,
) -> dict[str, float]:
    """COCO bbox AP of ``detections`` against ``gt``.

    Args:
        gt: path of a COCO instances JSON, or a loaded pycocotools ``COCO``.
        detections: dicts ``image_id`` (int), ``category_id`` (COCO id),
            ``bbox`` ``[x, y, w, h]`` in original-image pixels, ``score``.
            Not modified (pycocotools mutates its input; a copy is passed).
        image_ids: evaluate on these images only; default every GT image.
            Images without detections count as missed objects.
        verbose: print pycocotools' progress and summary table.
        per_iou: also return AP at each of COCO's IoU thresholds, keys ``"AP@0.50"`` ...
            ``"AP@0.95"`` (all areas, 100 detections per image; AP is their mean). They show
            where two models differ: at loose IoU (finding objects) or at strict IoU (localising them).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` floats in [0, 1];
        NaN where pycocotools reports -1 (no GT in that area range). With no
        detections every defined metric is 0.0.
    """
    coco_gt = load_coco_gt(gt, verbose=verbose)
    known_images = set(coco_gt.getImgIds())
    if image_ids is None:
        image_ids = sorted(known_images)
    else:
        image_ids = sorted({int(i) for i in image_ids})
        unknown = [i for i in image_ids if i not in known_images]
        if unknown:
            raise ValueError(f"image_ids {unknown[:5]} are not in the ground truth; evaluate only annotated images")
    unknown = sorted({int(d["image_id"]) for d in detections} - known_images)
    if unknown:
        raise ValueError(
            f"detections refer to image ids {unknown[:5]} that are not in the ground truth; "
            "check that detections carry COCO image ids, not dataset positions"
        )
    wanted = set(image_ids)
    detections = [copy.deepcopy(dict(d)) for d in detections if int(d["image_id"]) in wanted]

    with _quiet(verbose):
        coco_dt = coco_gt.loadRes(detections) if detections else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats[: len(METRIC_NAMES)]]
    metrics = {name: (math.nan if value < 0 else value) for name, value in zip(METRIC_NAMES, stats)}
    if per_iou:
        metrics.update(_ap_per_iou(evaluator))
    return metrics


def _ap_per_iou(evaluator: COCOeval) -> dict[str, float]:
    """AP at each IoU threshold, averaged over recall points and classes as COCOeval.summarize does."""
    out = {}
    precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M max dets]
    area, max_dets = evaluator.params.areaRngLbl.index("all"), len(evaluator.params.maxDets) - 1
    for t, threshold in enumerate(evaluator.params.iouThrs):
        p = precision[t, :, :, area, max_dets]
        valid = p[p > -1]
        out[f"AP@{threshold:.2f}"] = float(valid.mean()) if valid.size else math.nan
    return out


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    category_map_to_category_id: Callable[[int], int],
) -> list[dict]:
    """Convert one image's detections to COCO result dicts.

    Args:
        image_id: COCO image id.
        boxes: float ``[D, 4]`` ``(x1, y1, x2, y2)`` in ORIGINAL image pixels
            (undo the resize before calling).
        scores: float ``[D]``.
        labels: int64 ``[D]`` contiguous labels.
        category_map_to_category_id: maps a contiguous label to a COCO category id
            (e.g. ``CategoryMap.to_category_id``).

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [D, 4], got {tuple(boxes.shape)}")
    if not (scores.shape == labels.shape == (boxes.shape[0],)):
        raise ValueError(
            f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both have shape [{boxes.shape[0]}]"
        )
    xywh = boxes.detach().to("cpu", torch.float64).clone()
    xywh[:, 2:] -= xywh[:, :2]
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_map_to_category_id(int(label))),
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        for box, score, label in zip(xywh.tolist(), scores.detach().cpu().tolist(), labels.detach().cpu().tolist())
    ]


def _format_value(value, percent: bool, digits: int) -> str:
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "-"
    return f"{value * 100 if percent else value:.{digits}f}"


def format_metrics_table(
    rows: Mapping[str, Mapping[str, float]], *, percent: bool = True, digits: int = 1
) -> str:
    """Aligned text table, one row per run, one column per metric.

    Columns are the COCO metrics present (in ``METRIC_NAMES`` order) followed
    by any other keys in first-seen order. Values are shown as percent with
    ``digits`` decimals (``percent=False``: raw values); NaN or missing -> "-".
    """
    columns = [name for name in METRIC_NAMES if any(name in metrics for metrics in rows.values())]
    for metrics in rows.values():
        columns += [key for key in metrics if key not in columns]
    header = ["name", *columns]
    body = [[str(name), *(_format_value(metrics.get(c), percent, digits) for c in columns)] for name, metrics in rows.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        # Names left-aligned, numbers right-aligned so decimal points line up.
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in body)])
