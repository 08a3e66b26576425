"""benchmarks/localisation_vs_scores.py: per-object box quality and what the scores keep, checked on a
detector whose boxes are its anchors (zero regression) and whose scores are set by hand."""

import pytest
import torch
from torchvision.ops import box_iou

from sadpipe.geometry import AnchorLayout
from sadpipe.labeling import match_anchors

from conftest import load_benchmark

LAYOUT = AnchorLayout(strides=(8, 16, 32, 64, 128), sizes=(16.0, 32.0, 64.0, 128.0, 256.0))
PADDED, K = (128, 128), 2
BOXES = torch.tensor([[10.3, 12.7, 47.1, 41.9], [70.2, 55.1, 118.6, 121.3]])  # off-grid: no two anchors tie in IoU
LABELS = torch.tensor([1, 0])


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("localisation_vs_scores")


class AnchorsAsBoxes(torch.nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.layout, self.cls = LAYOUT, cls

    def forward(self, images):
        return self.cls[None], torch.zeros(1, self.cls.shape[0], 4)


def sample():
    return {"image": torch.zeros(3, *PADDED), "padded_size": PADDED, "boxes": BOXES, "labels": LABELS,
            "iscrowd": torch.zeros(2, dtype=torch.bool)}


def candidates():
    anchors = LAYOUT.anchors(PADDED)
    matched = match_anchors(anchors, BOXES)
    out = []
    for g in range(len(BOXES)):
        idx = torch.where(matched == g)[0]
        out.append((idx, box_iou(anchors[idx], BOXES[g : g + 1])[:, 0]))
    return anchors.shape[0], out


@pytest.mark.parametrize("order", ["worst_first", "best_first"])
def test_the_top_scoring_box_and_the_rank_correlation(bench, order):
    num_anchors, per_gt = candidates()
    assert all(len(idx) >= 3 for idx, _ in per_gt)
    cls = torch.full((num_anchors, K), -10.0)
    for g, (idx, iou) in enumerate(per_gt):
        # scores that rank the candidates by IoU, or against it: the GT's class only
        rank = iou.argsort().argsort().float()
        cls[idx, LABELS[g]] = rank if order == "best_first" else -rank
    r = bench.localisation(AnchorsAsBoxes(cls), [sample()], images=1)
    ious = torch.cat([iou for _, iou in per_gt])
    assert r["gt_objects"] == 2 and r["candidates_per_object"] == pytest.approx(len(ious) / 2)
    assert r["box_iou_mean"] == pytest.approx(float(ious.mean()))
    assert r["best_iou"] == pytest.approx(sum(float(iou.max()) for _, iou in per_gt) / 2)
    pick = max if order == "best_first" else min
    assert r["top_score_iou"] == pytest.approx(sum(float(pick(iou)) for _, iou in per_gt) / 2)
    # scores that order the boxes exactly as their IoU does (or exactly against it): Spearman +1 (-1)
    assert r["score_iou_rank_corr"] == pytest.approx(1.0 if order == "best_first" else -1.0)
    assert r["top_score_iou_at_least_0.85"] == sum(float(pick(iou)) >= 0.85 for _, iou in per_gt) / 2


def test_spearman_by_hand(bench):
    # ranks (0, 1, 2, 3) and (1, 0, 3, 2): centred (-1.5, -0.5, 0.5, 1.5) and (-0.5, -1.5, 1.5, 0.5);
    # dot 0.75 + 0.75 + 0.75 + 0.75 = 3, norms sqrt(5) each: rho = 3 / 5 = 0.6
    assert bench.spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.2, 0.1, 0.9, 0.5])) == pytest.approx(0.6)
