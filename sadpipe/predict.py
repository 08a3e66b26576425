"""Running a detector over a dataset: head outputs, detections, COCO evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .data.dataset import DetectionDataset, collate
from .evaluate import coco_evaluate, detections_to_coco
from .labeling import postprocess
from .models import Detector
from .training import move_to


class AnchorCache:
    """Anchors per canvas size, built once on the device."""

    def __init__(self, layout, device):
        self.layout, self.device, self._cache = layout, device, {}

    def __call__(self, canvas: tuple[int, int]) -> torch.Tensor:
        if canvas not in self._cache:
            self._cache[canvas] = self.layout.anchors(canvas).to(self.device)
        return self._cache[canvas]


def autocast(device: torch.device, enabled: bool):
    """float16 autocast on CUDA when enabled; a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


def detections_in_original_pixels(boxes: torch.Tensor, size: tuple[int, int], orig_size: tuple[int, int]) -> torch.Tensor:
    """float32 [D, 4] boxes mapped from resized-image pixels back to the original image (per axis)."""
    sy, sx = orig_size[0] / size[0], orig_size[1] / size[1]
    return boxes.float().cpu() * torch.tensor([sx, sy, sx, sy])


@torch.no_grad()
def run_detector(model: Detector, loader: DataLoader, device: torch.device, detect_cfg: dict, *, amp: bool = True):
    """Yield (batch, cls_logits [B, A, K] float32, bbox_regression [B, A, 4] float32, detections list) per batch.

    Detections are in resized-image pixels, like the batch's ``boxes``.
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
                           score_thresh=detect_cfg["score_thresh"], nms_thresh=detect_cfg["nms_thresh"],
                           detections_per_img=detect_cfg["detections_per_img"],
                           topk_candidates=detect_cfg["topk_candidates"])
        yield batch, cls_logits, bbox, dets


def evaluate_model(model: Detector, source, cfg: dict, device: torch.device, *, batch_size: int = 16,
                   num_workers: int = 0, out_json: Path | None = None) -> dict:
    """COCO metrics of ``model`` on a labeled source (instances JSON); optionally writes detections + metrics."""
    dataset = DetectionDataset(source, model.preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    results = []
    for batch, _, _, dets in run_detector(model, loader, device, cfg["detect"]):
        for i, d in enumerate(dets):
            boxes = detections_in_original_pixels(d["boxes"], batch["size"][i], batch["orig_size"][i])
            results.extend(detections_to_coco(batch["image_id"][i], boxes, d["scores"], d["labels"],
                                              source.categories.to_category_id))
    metrics = coco_evaluate(str(source.annotations_path), results,
                            image_ids=[r.image_id for r in source.images])
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"metrics": metrics, "num_detections": len(results)}, indent=2))
    return metrics
