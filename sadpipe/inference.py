"""Running a detector: over a DataLoader (head outputs, detections), on one image padded alone
(logits), and the COCO evaluation of a model on a labeled source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.dataset import DetectionDataset, collate
from .evaluate import coco_evaluate, detections_to_coco
from .labeling import postprocess
from .models import Detector
from .engine.device import AnchorCache, autocast, move_to


def detections_in_original_pixels(boxes: torch.Tensor, size: tuple[int, int], orig_size: tuple[int, int]) -> torch.Tensor:
    """float32 [D, 4] boxes mapped from resized-image pixels back to the original image (per axis)."""
    sy, sx = orig_size[0] / size[0], orig_size[1] / size[1]
    return boxes.float().cpu() * torch.tensor([sx, sy, sx, sy])


@torch.no_grad()
def logits_alone(model: Detector, preprocess, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 [A, K] (CPU): the class logits of ``model`` on one uint8 [H, W, 3] image resized and
    padded alone (its own padded size, as the dump batches images)."""
    _, padded = preprocess.sizes(*image.shape[:2])
    x = preprocess(image)
    batch = torch.zeros((1, 3, *padded))
    batch[0, :, : x.shape[1], : x.shape[2]] = x
    return model(batch.to(device))[0][0].float().cpu()


@torch.no_grad()
def run_detector(model: Detector, loader: DataLoader, device: torch.device, detect, *, amp: bool = True):
    """Yield (batch, cls_logits [B, A, K] float32, bbox_regression [B, A, 4] float32, detections list) per batch.

    Detections are in resized-image pixels, like the batch's ``boxes``; ``detect``: a ``settings.DetectConfig``.
    """
    model.eval()
    anchors = AnchorCache(model.layout, device)
    for batch in loader:
        images = move_to(batch["images"], device)
        with autocast(device, amp):
            cls_logits, bbox = model(images)
        cls_logits, bbox = cls_logits.float(), bbox.float()
        level_sizes = model.layout.anchors_per_level(batch["canvas"])
        dets = postprocess(cls_logits, bbox, anchors(batch["canvas"]), batch["size"], level_sizes,
                           score_thresh=detect.score_thresh, nms_thresh=detect.nms_thresh,
                           detections_per_img=detect.detections_per_img, topk_candidates=detect.topk_candidates)
        yield batch, cls_logits, bbox, dets


def evaluate_model(model: Detector, source, detect, device: torch.device, *, batch_size: int = 16,
                   num_workers: int = 0, out_json: Path | None = None, per_iou: bool = False) -> dict:
    """COCO metrics of ``model`` on a labeled source (instances JSON), detections made as ``detect``
    (a ``settings.DetectConfig``) says; optionally writes the metrics and the detection count.
    ``per_iou`` adds AP at each IoU threshold (``evaluate.coco_evaluate``)."""
    dataset = DetectionDataset(source, model.preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    results = []
    for batch, _, _, dets in run_detector(model, loader, device, detect):
        for i, d in enumerate(dets):
            boxes = detections_in_original_pixels(d["boxes"], batch["size"][i], batch["orig_size"][i])
            results.extend(detections_to_coco(batch["image_id"][i], boxes, d["scores"], d["labels"],
                                              source.categories.to_category_id))
    metrics = coco_evaluate(str(source.annotations_path), results,
                            image_ids=[r.image_id for r in source.images], per_iou=per_iou)
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"metrics": metrics, "num_detections": len(results)}, indent=2))
    return metrics
