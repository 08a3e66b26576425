"""How strong each distillation loss pulls on the student: value and gradient norm w.r.t. the student logits.

    python benchmarks/distill_gradient_scale.py --config pipelines/toy.toml --cache runs/demo/cache.zarr \
        --student runs/demo/student_alone/final.pt [--images 16]

For one batch of labeled images with their cached teacher logits, prints the normalised loss
(sum / max(1, sum q^1.8)) and the L2 norm of its gradient for plain KD, ADL (paper and released
variants), FDL (beta = 0) and Chen et al.'s weighted soft cross-entropy, for a freshly initialised student and for ``--student`` if given.
The ratio KD/ADL explains how much weight ADL needs to pull as hard as KD (docs/results.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sadpipe import losses
from sadpipe.cache import TeacherCache
from sadpipe.cache.targets import decode as decode_targets
from sadpipe.settings import load_settings
from sadpipe.data.dataset import DetectionDataset, collate, labeled_source
from sadpipe.tasks.distill import WithTeacher
from sadpipe.models import load_detector
from sadpipe.tasks.supervised import build_model_for

LOSSES = {
    "kd": lambda s, t, d: losses.binary_kd_loss(s, t, temperature=d.temperature),
    "adl": lambda s, t, d: losses.adaptive_distillation_loss(s, t, beta=d.beta, gamma=d.gamma),
    "adl_released": lambda s, t, d: losses.adaptive_distillation_loss(s, t, beta=d.beta, gamma=d.gamma,
                                                                      variant="released"),
    "fdl": lambda s, t, d: losses.focal_distillation_loss(s, t, gamma=d.gamma),
    "weighted_ce": lambda s, t, d: losses.weighted_soft_cross_entropy(s, t, background_weight=d.background_weight),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--student", type=Path, default=None)
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = load_settings(args.config, args.overrides)
    cache = TeacherCache(args.cache)
    src = labeled_source(cfg.data, "train")
    students = {"fresh": build_model_for(cfg, "student", src.categories)}
    if args.student:
        students[str(args.student)] = load_detector(args.student)
    print("| student | loss | normalised loss | grad norm | KD / this (grad) |")
    print("|---|---|---|---|---|")
    for name, student in students.items():
        student.train()
        data = WithTeacher(DetectionDataset(src, student.preprocess, image_ids=cache.ok_image_ids("labeled")), cache,
                           None)
        batch = collate([data[i] for i in range(args.images)])
        if len({tuple(p) for p in batch["padded_size"]}) != 1:
            raise SystemExit("images of several padded sizes in the batch; use the toy data or fewer images")
        logits = student(batch["images"])[0].detach()
        teacher = torch.stack([decode_targets(t, cache.code_table) for t in batch["teacher"]])
        norm = losses.adaptive_normalizer(teacher, power=cfg.distill.normalizer_power)
        rows = {}
        for loss_name, fn in LOSSES.items():
            s = logits.clone().requires_grad_(True)
            value = fn(s, teacher, cfg.distill).sum() / norm
            (grad,) = torch.autograd.grad(value, s)
            rows[loss_name] = (value.item(), grad.norm().item())
        for loss_name, (value, gnorm) in rows.items():
            print(f"| {name} | {loss_name} | {value:.4f} | {gnorm:.5f} | {rows['kd'][1] / gnorm:.1f} |")


if __name__ == "__main__":
    main()
