import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from sadpipe.labeling import BACKGROUND, IGNORED, decode_boxes, detection_loss, match_anchors, postprocess

NUM_CLASSES = 5


# ---------------------------------------------------------------- matching by hand

def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_match_thresholds_ignore_band_and_low_quality():
    gt = _t([[0, 0, 10, 10], [100, 100, 110, 130]])
    anchors = _t(
        [
            [0, 0, 10, 10],  # IoU with gt0 = 100/100 = 1.0 -> fg 0
            [0, 0, 10, 8],  # inter 80, union 100 -> 0.8 -> fg 0
            [0, 0, 10, 4.5],  # inter 45, union 100 -> 0.45 in [0.4, 0.5) -> ignored
            [0, 0, 10, 3],  # 30/100 = 0.3 -> background
            [20, 20, 30, 30],  # no overlap -> background
            [100, 100, 110, 110],  # gt1 area 300: inter 100, union 300 -> 0.333 < 0.4,
            # but it is gt1's best anchor -> low-quality match to gt1
        ]
    )
    got = match_anchors(anchors, gt, torch.tensor([False, False]))
    assert got.tolist() == [0, 0, IGNORED, BACKGROUND, BACKGROUND, 1]
    got = match_anchors(anchors, gt, torch.tensor([False, False]), allow_low_quality=False)
    assert got.tolist() == [0, 0, IGNORED, BACKGROUND, BACKGROUND, BACKGROUND]
    assert got.dtype == torch.int64


def test_match_crowd_boxes_never_positive_and_indices_map_back():
    # gt list: [crowd C, regular G, crowd C2 = copy of G]
    gt = _t([[200, 200, 220, 220], [0, 0, 10, 10], [0, 0, 10, 10]])
    iscrowd = torch.tensor([True, False, True])
    anchors = _t(
        [
            [0, 0, 10, 10],  # IoU 1 with G (index 1) and with C2: stays fg, index 1 (not 0 of the subset)
            [200, 200, 220, 216],  # with C (area 400): inter 320, union 400 -> 0.8 >= 0.5 -> ignored
            [200, 200, 220, 208],  # with C: 160/400 = 0.4 < 0.5 -> stays background
            [0, 0, 10, 3],  # with G and C2: 0.3 -> background (C2 below fg_iou too)
        ]
    )
    got = match_anchors(anchors, gt, iscrowd)
    # The crowd box C is the best box for anchors 1 and 2 but gets no low-quality match.
    assert got.tolist() == [1, IGNORED, BACKGROUND, BACKGROUND]


def test_match_no_gt_and_only_crowd():
    anchors = _t([[0, 0, 10, 10], [50, 50, 60, 60]])
    got = match_anchors(anchors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool))
    assert got.tolist() == [BACKGROUND, BACKGROUND]
    # Only a crowd box equal to anchor 0 (IoU 1): ignored, the other background.
    got = match_anchors(anchors, _t([[0, 0, 10, 10]]), torch.tensor([True]))
    assert got.tolist() == [IGNORED, BACKGROUND]


def test_match_degenerate_gt_does_not_grab_every_anchor():
    # A zero-width box has IoU 0 with everything; torchvision's low-quality rule
    # would tie it with all anchors. Here it matches nothing; the normal box still matches.
    anchors = _t([[0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]])
    gt = _t([[30, 30, 30, 40], [50, 50, 60, 60]])
    got = match_anchors(anchors, gt, None)
    assert got.tolist() == [BACKGROUND, 1, BACKGROUND]


def test_match_rejects_bad_input():
    with pytest.raises(ValueError, match="gt_boxes"):
        match_anchors(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="bg_iou"):
        match_anchors(torch.zeros(3, 4), torch.zeros(2, 4), fg_iou=0.3, bg_iou=0.5)


# ---------------------------------------------------------------- against torchvision RetinaNet


class _NoBackbone(nn.Module):
    out_channels = 8


def _tiny_retinanet(box_loss: str) -> RetinaNet:
    head = RetinaNetHead(8, 9, NUM_CLASSES)
    head.regression_head._loss_type = box_loss
    model = RetinaNet(_NoBackbone(), NUM_CLASSES, head=head)
    return model


def _grid_anchors(image=64, strides=(8, 16, 32), sizes=(1.0, 1.5, 2.0), ratios=(0.5, 1.0, 2.0)):
    """Anchors in torchvision order: level, cell (y, x), ratio, scale. Returns anchors, level sizes."""
    all_anchors, level_sizes = [], []
    for stride in strides:
        cells = image // stride
        level = []
        for y in range(cells):
            for x in range(cells):
                cx, cy = x * stride, y * stride
                for ratio in ratios:
                    for scale in sizes:
                        side = 4 * stride * scale
                        h = side * ratio**0.5
                        w = side / ratio**0.5
                        level.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        all_anchors += level
        level_sizes.append(len(level))
    return torch.tensor(all_anchors, dtype=torch.float32), level_sizes


def _random_targets(generator, batch, image=64, max_boxes=4):
    targets = []
    for i in range(batch):
        n = 0 if i == 1 else int(torch.randint(1, max_boxes + 1, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * (image - 20)
        wh = 6 + torch.rand(n, 2, generator=generator) * 30
        boxes = torch.cat([xy, (xy + wh).clamp(max=image)], dim=1)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(n, dtype=torch.bool)})
    return targets


@pytest.mark.parametrize("box_loss", ["l1", "giou", "smooth_l1"])
def test_detection_loss_matches_torchvision(box_loss):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    anchors, _ = _grid_anchors()
    batch = 3
    cls_logits = (torch.randn(batch, anchors.shape[0], NUM_CLASSES) * 2).requires_grad_()
    bbox_regression = (torch.randn(batch, anchors.shape[0], 4) * 0.3).requires_grad_()
    targets = _random_targets(generator, batch)

    model = _tiny_retinanet(box_loss)
    expected = model.compute_loss(
        targets, {"cls_logits": cls_logits, "bbox_regression": bbox_regression}, [anchors] * batch
    )
    got = detection_loss(cls_logits, bbox_regression, anchors, targets, box_loss=box_loss)
    torch.testing.assert_close(got["classification"], expected["classification"])
    torch.testing.assert_close(got["box_regression"], expected["bbox_regression"])

    # Gradients agree as well.
    g_expected = torch.autograd.grad(expected["classification"] + expected["bbox_regression"], [cls_logits, bbox_regression])
    g_got = torch.autograd.grad(got["classification"] + got["box_regression"], [cls_logits, bbox_regression])
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b)

    # matched_idxs: torchvision's matcher per image (no crowd, no degenerate boxes here).
    assert got["matched_idxs"].shape == (batch, anchors.shape[0])
    assert (got["matched_idxs"][1] == BACKGROUND).all()  # image 1 has no GT
    assert int(got["num_foreground"]) == int((got["matched_idxs"] >= 0).sum())
    assert int(got["num_foreground"]) > 0


def test_detection_loss_ignores_crowd_anchors():
    anchors, _ = _grid_anchors()
    torch.manual_seed(3)
    cls_logits = torch.randn(1, anchors.shape[0], NUM_CLASSES)
    bbox_regression = torch.zeros(1, anchors.shape[0], 4)
    crowd_box = anchors[100:101].clone()  # equal to anchor 100 -> IoU 1 -> ignored
    with_crowd = [{"boxes": crowd_box, "labels": torch.tensor([2]), "iscrowd": torch.tensor([True])}]
    out = detection_loss(cls_logits, bbox_regression, anchors, with_crowd)
    assert out["matched_idxs"][0, 100] == IGNORED
    assert int(out["num_foreground"]) == 0
    # Independent: focal loss with all-zero targets over the non-ignored anchors, divisor max(1, 0) = 1.
    keep = out["matched_idxs"][0] != IGNORED
    expected = torchvision.ops.sigmoid_focal_loss(
        cls_logits[0][keep], torch.zeros_like(cls_logits[0][keep]), reduction="sum"
    )
    torch.testing.assert_close(out["classification"], expected)
    assert out["box_regression"].item() == 0.0


def test_detection_loss_rejects_bad_labels():
    anchors, _ = _grid_anchors()
    cls_logits = torch.zeros(1, anchors.shape[0], NUM_CLASSES)
    bbox_regression = torch.zeros(1, anchors.shape[0], 4)
    bad = [{"boxes": _t([[0, 0, 10, 10]]), "labels": torch.tensor([NUM_CLASSES])}]
    with pytest.raises(ValueError, match="contiguous labels"):
        detection_loss(cls_logits, bbox_regression, anchors, bad)
    with pytest.raises(ValueError, match="target dicts"):
        detection_loss(cls_logits, bbox_regression, anchors, [])


def test_decode_boxes_by_hand():
    # Anchor [0, 0, 10, 20]: w 10, h 20, centre (5, 10).
    # deltas (0.1, -0.2, log 2, 0): centre (5 + 0.1*10, 10 - 0.2*20) = (6, 6),
    # size (10*2, 20) = (20, 20) -> box [-4, -4, 16, 16].
    anchors = _t([[0, 0, 10, 20]])
    deltas = torch.tensor([[[0.1, -0.2, 0.6931471805599453, 0.0]]])
    torch.testing.assert_close(decode_boxes(deltas, anchors), torch.tensor([[[-4.0, -4.0, 16.0, 16.0]]]))


def test_postprocess_matches_torchvision():
    torch.manual_seed(4)
    anchors, level_sizes = _grid_anchors()
    batch = 2
    cls_logits = torch.randn(batch, anchors.shape[0], NUM_CLASSES) * 2 - 2
    bbox_regression = torch.randn(batch, anchors.shape[0], 4) * 0.2
    image_sizes = [(64, 64), (48, 40)]  # second image padded inside the 64x64 batch
    kwargs = dict(score_thresh=0.1, topk_candidates=50, nms_thresh=0.5, detections_per_img=30)

    model = _tiny_retinanet("l1")
    model.score_thresh, model.topk_candidates = kwargs["score_thresh"], kwargs["topk_candidates"]
    model.nms_thresh, model.detections_per_img = kwargs["nms_thresh"], kwargs["detections_per_img"]
    split = {
        "cls_logits": list(cls_logits.split(level_sizes, dim=1)),
        "bbox_regression": list(bbox_regression.split(level_sizes, dim=1)),
    }
    expected = model.postprocess_detections(split, [list(anchors.split(level_sizes))] * batch, image_sizes)
    got = postprocess(cls_logits, bbox_regression, anchors, image_sizes, level_sizes, **kwargs)
    assert len(got) == batch
    for g, e in zip(got, expected):
        assert g["boxes"].shape[0] == 30  # enough candidates to fill detections_per_img
        torch.testing.assert_close(g["boxes"], e["boxes"])
        torch.testing.assert_close(g["scores"], e["scores"])
        assert torch.equal(g["labels"], e["labels"])
    # Clipping to the second image's own size.
    assert got[1]["boxes"][:, 2].max() <= 40 and got[1]["boxes"][:, 3].max() <= 48


def test_postprocess_rejects_bad_level_sizes():
    anchors, level_sizes = _grid_anchors()
    with pytest.raises(ValueError, match="level_sizes"):
        postprocess(
            torch.zeros(1, anchors.shape[0], 2), torch.zeros(1, anchors.shape[0], 4), anchors, [(64, 64)], level_sizes[:-1]
        )
