"""How confident is a teacher? The numbers behind "weak" and "confident" in docs/results.md.

Runs a sadpipe checkpoint over images of a split (each padded alone, as the dump does) and prints:
detections per image at score >= 0.5 and >= 0.3 (after the dump's postprocessing), the max q per
image, percentiles of q = sigmoid(logit) over all (anchor, class) entries and over the
"background" entries (anchors whose max q < 0.05), and the share of entries above the default
codec's floor (q >= 0.03: what the compact record stores).

    python benchmarks/teacher_confidence.py --config pipelines/toy.toml --teacher runs/teacher/final.pt \
        --set data.root=data/toy --images 64
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from sadpipe.cache.codec import default_codec
from sadpipe.settings import load_settings
from sadpipe.data.dataset import labeled_source
from sadpipe.data.images import read_image
from sadpipe.labeling import postprocess
from sadpipe.models import load_detector

PERCENTILES = (50, 90, 99, 99.9)


@torch.no_grad()
def teacher_confidence(teacher, records, detect: dict, floor: float) -> dict:
    layout, pre = teacher.layout, teacher.preprocess
    q_all, q_bg, dets50, dets30, max_q, above, total = [], [], [], [], [], 0, 0
    rng = np.random.default_rng(0)
    for r in records:
        image = read_image(r.path)
        size, padded = pre.sizes(*image.shape[:2])
        x = pre(image)
        batch = torch.zeros(1, 3, *padded)
        batch[0, :, : x.shape[1], : x.shape[2]] = x
        cls, box = teacher(batch)
        q = torch.sigmoid(cls[0].double())
        above += int((q >= floor).sum())
        total += q.numel()
        max_q.append(float(q.max()))
        flat = q.reshape(-1).numpy()
        q_all.append(rng.choice(flat, size=min(flat.size, 20000), replace=False))
        bg = q[q.max(dim=1).values < 0.05].reshape(-1).numpy()
        if bg.size:
            q_bg.append(rng.choice(bg, size=min(bg.size, 20000), replace=False))
        d = postprocess(cls, box, layout.anchors(padded), [size], layout.anchors_per_level(padded),
                        score_thresh=min(0.3, detect.score_thresh), nms_thresh=detect.nms_thresh,
                        detections_per_img=detect.detections_per_img, topk_candidates=detect.topk_candidates)[0]
        dets50.append(int((d["scores"] >= 0.5).sum()))
        dets30.append(int((d["scores"] >= 0.3).sum()))
    q_all, q_bg = np.concatenate(q_all), np.concatenate(q_bg) if q_bg else np.zeros(1)
    return {
        "images": len(records),
        "detections_per_image_at_0.5": float(np.mean(dets50)),
        "detections_per_image_at_0.3": float(np.mean(dets30)),
        "max_q_per_image_median": float(np.median(max_q)),
        "q_percentiles": {str(p): float(np.percentile(q_all, p)) for p in PERCENTILES},
        "background_q_percentiles": {str(p): float(np.percentile(q_bg, p)) for p in PERCENTILES},
        "share_above_codec_floor": above / total,
        "codec_floor": floor,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--teacher", required=True, action="append", help="checkpoint (repeatable)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_settings(args.config, args.overrides)
    records = labeled_source(cfg.data, args.split).images[: args.images]
    floor = default_codec().floor
    out = {}
    for path in args.teacher:
        out[path] = teacher_confidence(load_detector(path).eval(), records, cfg.detect, floor)
        print(json.dumps({path: out[path]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
