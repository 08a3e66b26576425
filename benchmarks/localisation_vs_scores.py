"""Does a detector lose strict-IoU AP in its box branch or in its scores? Per GT object, on val.

    python benchmarks/localisation_vs_scores.py --config toy_paper_regime --set data.root=data/toy \
        --checkpoint runs/paper_regime/bench/table/student_alone_seed0/final.pt \
        --checkpoint runs/paper_regime/bench/table/sad_labeled__unlabeled_loss_weight_8_seed0/final.pt

For every GT box of ``--images`` val images (each padded alone), the anchors RetinaNet's matching
assigns to it (IoU >= 0.5, plus its best anchor) are its candidates. Each candidate's box is its
anchor decoded with the model's box regression, its score the model's q for the GT's class.

- ``box_iou_mean``: mean IoU of the candidates' boxes with their GT (the box branch alone);
- ``best_iou``: per GT, the highest IoU among its candidates' boxes (what the box branch offers);
- ``top_score_iou``: per GT, the IoU of the candidate with the highest score (what NMS keeps);
- ``top_score_iou_at_least_0.85``: share of GTs whose top-scoring box reaches IoU 0.85;
- ``score_iou_rank_corr``: per GT with 3 or more candidates, Spearman correlation of score and
  IoU across its candidates (1: the scores rank the boxes by how well they fit), averaged.

If two models have the same box branch (equal ``best_iou``) but one keeps worse boxes
(lower ``top_score_iou``), its scores are what cost it AP at strict IoU.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torchvision.ops import box_iou

from sadpipe.data.dataset import DetectionDataset, labeled_source
from sadpipe.labeling import decode_boxes, match_anchors
from sadpipe.models import load_detector
from sadpipe.settings import load_settings
from sadpipe.transforms import pad_batch


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def localisation(model, dataset, images: int) -> dict:
    """Per-GT figures over the first ``images`` samples of ``dataset``; see the module docstring."""
    ious, best, top, corr = [], [], [], []
    for index in range(min(images, len(dataset))):
        sample = dataset[index]
        if sample["boxes"].numel() == 0:
            continue
        x, _ = pad_batch([sample["image"]], [sample["padded_size"]])  # padded alone, as the dump does
        cls, box = model(x)
        anchors = model.layout.anchors(sample["padded_size"])
        boxes = decode_boxes(box.float(), anchors)[0]
        scores = torch.sigmoid(cls[0].float())
        matched = match_anchors(anchors, sample["boxes"], sample["iscrowd"])
        for g, (gt_box, label) in enumerate(zip(sample["boxes"], sample["labels"])):
            candidates = torch.where(matched == g)[0]
            if candidates.numel() == 0:
                continue
            iou = box_iou(boxes[candidates], gt_box[None])[:, 0]
            score = scores[candidates, label]
            ious += iou.tolist()
            best.append(float(iou.max()))
            top.append(float(iou[score.argmax()]))
            if candidates.numel() >= 3:
                corr.append(spearman(score, iou))
    return {
        "gt_objects": len(best),
        "candidates_per_object": len(ious) / len(best),
        "box_iou_mean": statistics.mean(ious),
        "best_iou": statistics.mean(best),
        "top_score_iou": statistics.mean(top),
        "top_score_iou_at_least_0.85": sum(t >= 0.85 for t in top) / len(top),
        "score_iou_rank_corr": statistics.mean(corr) if corr else float("nan"),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--checkpoint", action="append", required=True, help="repeatable")
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_settings(args.config, args.overrides)
    print("| checkpoint | objects | candidates / object | mean IoU of candidates | best IoU | IoU of the top-scoring box "
          "| top-scoring box IoU >= 0.85 | rank corr(score, IoU) |")
    print("|---|---|---|---|---|---|---|---|")
    out = {}
    for path in args.checkpoint:
        model = load_detector(path).eval()
        r = out[path] = localisation(model, DetectionDataset(labeled_source(cfg.data, "val"), model.preprocess),
                                     args.images)
        print(f"| {path} | {r['gt_objects']} | {r['candidates_per_object']:.1f} | {r['box_iou_mean']:.3f} | "
              f"{r['best_iou']:.3f} | {r['top_score_iou']:.3f} | {100 * r['top_score_iou_at_least_0.85']:.1f} % | "
              f"{r['score_iou_rank_corr']:.3f} |", flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
