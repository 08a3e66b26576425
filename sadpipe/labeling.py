"""Ground-truth assignment to anchors, the supervised RetinaNet loss, and decoding.

Semantics follow torchvision's RetinaNet (``compute_loss`` and
``postprocess_detections``, torchvision 0.29) and reuse its ``Matcher``,
``BoxCoder`` and box ops, with two deliberate additions in matching:

- crowd boxes (COCO ``iscrowd``) are never positives; anchors overlapping a
  crowd box by IoU >= ``fg_iou`` that would otherwise be background are ignored;
- a GT box whose best IoU with every anchor is 0 (degenerate or outside the
  anchors) makes no low-quality matches. torchvision's low-quality rule would
  tie it with every anchor at IoU 0 and turn all background anchors into
  foreground; with any normal box the result is identical to torchvision's.

Matching runs under ``torch.no_grad``; the loss is differentiable in the head
outputs. All boxes are ``(x1, y1, x2, y2)`` pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou_loss

from sadpipe.losses import sigmoid_focal_loss

__all__ = [
    "BACKGROUND",
    "IGNORED",
    "decode_boxes",
    "detection_loss",
    "match_anchors",
    "postprocess",
]

BACKGROUND = Matcher.BELOW_LOW_THRESHOLD  # -1
IGNORED = Matcher.BETWEEN_THRESHOLDS  # -2

_BOX_LOSSES = ("l1", "smooth_l1", "giou")


class _PositiveQualityMatcher(Matcher):
    """torchvision's Matcher whose low-quality rule skips GTs with best IoU 0."""

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor) -> None:
        highest_quality_foreach_gt, _ = match_quality_matrix.max(dim=1)
        ties = match_quality_matrix == highest_quality_foreach_gt[:, None]
        # A GT that touches no anchor would tie with every anchor at IoU 0.
        ties &= highest_quality_foreach_gt[:, None] > 0
        pred_inds_to_update = torch.where(ties)[1]
        matches[pred_inds_to_update] = all_matches[pred_inds_to_update]


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")


@torch.no_grad()
def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_iscrowd: Tensor | None = None,
    *,
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    allow_low_quality: bool = True,
) -> Tensor:
    """Assign each anchor a GT index, background or ignored.

    Args:
        anchors: float ``[A, 4]``.
        gt_boxes: float ``[N, 4]`` in the same pixels as the anchors.
        gt_iscrowd: bool ``[N]`` or None (no crowd boxes).
        fg_iou: IoU at or above which an anchor is foreground.
        bg_iou: IoU below which an anchor is background; in between it is ignored.
        allow_low_quality: also match, for every (non-crowd) GT, the anchors of
            highest IoU with it, even below ``fg_iou`` (torchvision RetinaNet: True).

    Returns:
        int64 ``[A]``: index into ``gt_boxes`` (>= 0, never a crowd box),
        ``BACKGROUND`` (-1) or ``IGNORED`` (-2).
    """
    _check_boxes("anchors", anchors)
    _check_boxes("gt_boxes", gt_boxes)
    if not bg_iou <= fg_iou:
        raise ValueError(f"bg_iou ({bg_iou}) must be <= fg_iou ({fg_iou})")
    num_gt = gt_boxes.shape[0]
    if gt_iscrowd is None:
        gt_iscrowd = torch.zeros(num_gt, dtype=torch.bool, device=gt_boxes.device)
    if gt_iscrowd.shape != (num_gt,):
        raise ValueError(f"gt_iscrowd must have shape [{num_gt}], got {tuple(gt_iscrowd.shape)}")
    gt_iscrowd = gt_iscrowd.to(torch.bool)
    gt_boxes = gt_boxes.to(anchors.dtype)

    matched = torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.int64, device=anchors.device)
    regular_idxs = torch.where(~gt_iscrowd)[0]
    if regular_idxs.numel() > 0 and anchors.shape[0] > 0:
        matcher = _PositiveQualityMatcher(fg_iou, bg_iou, allow_low_quality_matches=allow_low_quality)
        local = matcher(box_iou(gt_boxes[regular_idxs], anchors))
        # Map indices into the non-crowd subset back to indices into gt_boxes.
        matched = torch.where(local >= 0, regular_idxs[local.clamp_min(0)], local)

    crowd_idxs = torch.where(gt_iscrowd)[0]
    if crowd_idxs.numel() > 0 and anchors.shape[0] > 0:
        crowd_iou = box_iou(gt_boxes[crowd_idxs], anchors).max(dim=0).values
        matched[(crowd_iou >= fg_iou) & (matched == BACKGROUND)] = IGNORED
    return matched


def _check_targets(targets: Sequence[dict], batch_size: int, num_classes: int) -> None:
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch_size} images")
    for i, target in enumerate(targets):
        for key in ("boxes", "labels"):
            if key not in target:
                raise ValueError(f"target {i} has no {key!r}; expected keys boxes, labels, iscrowd")
        _check_boxes(f"targets[{i}]['boxes']", target["boxes"])
        labels = target["labels"]
        if labels.shape != (target["boxes"].shape[0],):
            raise ValueError(f"targets[{i}]['labels'] must have shape [{target['boxes'].shape[0]}], got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must be contiguous labels in [0, {num_classes}), "
                f"got range [{int(labels.min())}, {int(labels.max())}]; map category ids with CategoryMap"
            )


def _box_regression_loss(
    kind: str, box_coder: BoxCoder, anchors: Tensor, gt_boxes: Tensor, regression: Tensor
) -> Tensor:
    """Summed box loss over matched (anchor, GT) pairs, as torchvision's ``_box_loss``."""
    if kind == "giou":
        predicted = box_coder.decode_single(regression, anchors)
        return generalized_box_iou_loss(predicted, gt_boxes, reduction="sum", eps=1e-7)
    target = box_coder.encode_single(gt_boxes, anchors)
    if kind == "l1":
        return F.l1_loss(regression, target, reduction="sum")
    return F.smooth_l1_loss(regression, target, reduction="sum", beta=1.0)


def detection_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    targets: Sequence[dict],
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    box_loss: str = "l1",
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> dict[str, Tensor]:
    """Supervised RetinaNet loss, with torchvision RetinaNet's ``compute_loss`` semantics.

    Per image: sigmoid focal loss summed over every non-ignored anchor and
    class, divided by ``max(1, foreground anchors of that image)``; box loss
    summed over foreground anchors (BoxCoder encoding for l1 / smooth_l1 with
    beta 1, decoded boxes for giou), same divisor. Both are averaged over images.

    Args:
        cls_logits: float ``[B, A, K]``.
        bbox_regression: float ``[B, A, 4]``.
        anchors: float ``[A, 4]``, one anchor set for the whole padded batch.
        targets: B dicts with ``boxes`` float32 ``[N, 4]``, ``labels`` int64
            ``[N]`` in ``[0, K)`` and optionally ``iscrowd`` bool ``[N]``.
        box_loss: "l1" (torchvision RetinaNet v1), "smooth_l1" or "giou" (v2).

    Returns:
        dict with ``classification`` and ``box_regression`` (scalar float
        tensors, differentiable), ``num_foreground`` (int64 scalar, total over
        the batch) and ``matched_idxs`` (int64 ``[B, A]``: GT index, -1
        background, -2 ignored; exclude -2 from distillation on labeled images).
    """
    if box_loss not in _BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {_BOX_LOSSES}, got {box_loss!r}")
    if cls_logits.dim() != 3 or bbox_regression.shape != (*cls_logits.shape[:2], 4):
        raise ValueError(
            f"expected cls_logits [B, A, K] and bbox_regression [B, A, 4], got "
            f"{tuple(cls_logits.shape)} and {tuple(bbox_regression.shape)}"
        )
    batch_size, num_anchors, num_classes = cls_logits.shape
    if anchors.shape != (num_anchors, 4):
        raise ValueError(f"anchors must have shape [{num_anchors}, 4] to match the head outputs, got {tuple(anchors.shape)}")
    _check_targets(targets, batch_size, num_classes)
    box_coder = BoxCoder(weights=box_coder_weights)

    classification_losses, box_losses, matched_per_image = [], [], []
    for logits, regression, target in zip(cls_logits, bbox_regression, targets):
        gt_boxes = target["boxes"].to(anchors.device, anchors.dtype)
        labels = target["labels"].to(anchors.device)
        matched = match_anchors(anchors, gt_boxes, target.get("iscrowd"), fg_iou=fg_iou, bg_iou=bg_iou)
        matched_per_image.append(matched)

        foreground = torch.where(matched >= 0)[0]
        divisor = max(1, foreground.numel())
        with torch.no_grad():
            gt_target = torch.zeros_like(logits)
            gt_target[foreground, labels[matched[foreground]]] = 1.0
        valid = matched != IGNORED
        classification_losses.append(
            sigmoid_focal_loss(logits[valid], gt_target[valid], alpha=focal_alpha, gamma=focal_gamma, reduction="sum")
            / divisor
        )
        box_losses.append(
            _box_regression_loss(
                box_loss, box_coder, anchors[foreground], gt_boxes[matched[foreground]], regression[foreground]
            )
            / divisor
        )

    matched_idxs = torch.stack(matched_per_image) if matched_per_image else torch.empty(0, num_anchors, dtype=torch.int64)
    return {
        "classification": torch.stack(classification_losses).sum() / max(1, batch_size),
        "box_regression": torch.stack(box_losses).sum() / max(1, batch_size),
        "num_foreground": (matched_idxs >= 0).sum(),
        "matched_idxs": matched_idxs,
    }


@torch.no_grad()
def foreground_box_targets(anchors: Tensor, gt_boxes: Tensor, matched: Tensor) -> tuple[Tensor, Tensor]:
    """The foreground anchors of one image and their encoded GT boxes (the box loss's targets).

    Args: ``anchors`` float [A, 4]; ``gt_boxes`` float [N, 4]; ``matched`` int64 [A] from
    :func:`match_anchors` (or ``detection_loss``'s ``matched_idxs`` row).
    Returns: (int64 [F] anchor indices, float32 [F, 4] deltas, BoxCoder weights 1).
    """
    foreground = torch.where(matched >= 0)[0]
    box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    deltas = box_coder.encode_single(gt_boxes.to(anchors)[matched[foreground]], anchors[foreground])
    return foreground, deltas


def decode_boxes(bbox_regression: Tensor, anchors: Tensor) -> Tensor:
    """Decode ``[B, A, 4]`` deltas against ``[A, 4]`` anchors (BoxCoder weights 1) to ``[B, A, 4]`` boxes."""
    if bbox_regression.dim() != 3 or anchors.shape != (bbox_regression.shape[1], 4):
        raise ValueError(
            f"expected bbox_regression [B, A, 4] and anchors [A, 4], got "
            f"{tuple(bbox_regression.shape)} and {tuple(anchors.shape)}"
        )
    batch_size, num_anchors, _ = bbox_regression.shape
    box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    flat_anchors = anchors.unsqueeze(0).expand(batch_size, -1, -1).reshape(-1, 4)
    decoded = box_coder.decode_single(bbox_regression.reshape(-1, 4), flat_anchors)
    return decoded.reshape(batch_size, num_anchors, 4)


@torch.no_grad()
def postprocess(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_sizes: Sequence[tuple[int, int]],
    level_sizes: Sequence[int],
    *,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> list[dict[str, Tensor]]:
    """Detections from head outputs, as torchvision RetinaNet ``postprocess_detections``.

    Per image and pyramid level: keep (anchor, class) entries with
    ``sigmoid(logit) > score_thresh``, the top ``topk_candidates`` of them,
    decode their boxes and clip them to the image's own ``(h, w)``; then
    class-wise NMS over all levels and keep the ``detections_per_img`` best.

    Args:
        cls_logits: ``[B, A, K]``; bbox_regression: ``[B, A, 4]``; anchors: ``[A, 4]``.
        image_sizes: B pairs ``(h, w)`` of the unpadded (resized) images.
        level_sizes: anchors per pyramid level, in head order, summing to A.

    Returns:
        B dicts: ``boxes`` float ``[D, 4]`` in the resized image's pixels,
        ``scores`` float ``[D]`` (descending), ``labels`` int64 ``[D]`` contiguous.
    """
    batch_size, num_anchors, num_classes = cls_logits.shape
    if bbox_regression.shape != (batch_size, num_anchors, 4) or anchors.shape != (num_anchors, 4):
        raise ValueError(
            f"shapes disagree: cls_logits {tuple(cls_logits.shape)}, bbox_regression "
            f"{tuple(bbox_regression.shape)}, anchors {tuple(anchors.shape)}"
        )
    if sum(level_sizes) != num_anchors:
        raise ValueError(f"level_sizes {list(level_sizes)} sum to {sum(level_sizes)}, not the {num_anchors} anchors")
    if len(image_sizes) != batch_size:
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {batch_size}")
    box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    level_sizes = [int(n) for n in level_sizes]
    anchors_per_level = anchors.split(level_sizes)

    detections = []
    for logits, regression, image_size in zip(cls_logits, bbox_regression, image_sizes):
        image_boxes, image_scores, image_labels = [], [], []
        for level_logits, level_regression, level_anchors in zip(
            logits.split(level_sizes), regression.split(level_sizes), anchors_per_level
        ):
            scores = torch.sigmoid(level_logits).flatten()
            candidate_idxs = torch.where(scores > score_thresh)[0]
            scores = scores[candidate_idxs]
            scores, order = scores.topk(min(topk_candidates, candidate_idxs.numel()))
            candidate_idxs = candidate_idxs[order]
            anchor_idxs = torch.div(candidate_idxs, num_classes, rounding_mode="floor")
            boxes = box_coder.decode_single(level_regression[anchor_idxs], level_anchors[anchor_idxs])
            image_boxes.append(clip_boxes_to_image(boxes, tuple(image_size)))
            image_scores.append(scores)
            image_labels.append(candidate_idxs % num_classes)
        boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections
