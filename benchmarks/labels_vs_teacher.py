"""What a teacher's targets add to the labels, on the images it was trained on and on others.

    python benchmarks/labels_vs_teacher.py --config toy_paper_regime --set data.root=data/toy \
        --teacher runs/confident_teacher/final.pt --student runs/paper_regime/bench/table/student_alone_seed0/final.pt \
        --images 128

Distillation on labeled images can only teach a student what the labels do not already say. For
each split (the labeled train images the teacher was trained on, and val, which it never saw) this
runs the teacher and the student over ``--images`` images (each padded alone, as the dump does),
assigns every anchor its label target y (RetinaNet's matching: IoU >= 0.5 positive, < 0.4
background, in between ignored; y = 1 for the matched GT's class, else 0) and compares the
teacher's q = sigmoid(logit) with y over the non-ignored (anchor, class) entries:

- ``teacher_q_at_positives``: mean q where y = 1; ``teacher_misses``: share of y = 1 entries with q < 0.5;
- ``teacher_false_per_image``: entries with y = 0 and q >= 0.5, per image;
- ``target_gap``: sum |q - y| divided by the number of y = 1 entries (0: the teacher repeats the labels);
- ``kd_label_cosine``: cosine between plain KD's gradient w.r.t. the student's logits (p - q) and
  the label cross-entropy's (p - y), summed over the images; ``kd_beyond_labels`` = sqrt(1 - cos^2),
  the share of KD's pull that points where the labels' pull does not;
- ``adl_label_cosine``: the same for ADL's gradient (the paper's form, beta 1, gamma 2), and
  ``wce_label_cosine`` for Chen et al.'s weighted soft cross-entropy (background weight 1.5, the
  soft part of their mixed loss);
- ``kd_grad_on_positives`` / ``adl_...`` / ``wce_...``: the share of each gradient's squared norm
  on the y = 1 entries (the rest is on background entries);
- ``kd_grad_against_labels`` / ``adl_...`` / ``wce_...``: the share of each gradient's squared
  norm on entries where it pushes the student's logit the other way than the labels do;
- ``student_to_teacher`` / ``student_to_labels``: ||p - q|| / ||p - y||, how far the student is
  from each target.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from sadpipe import losses
from sadpipe.data.dataset import DetectionDataset, labeled_source
from sadpipe.labeling import IGNORED, match_anchors
from sadpipe.models import load_detector
from sadpipe.settings import load_settings
from sadpipe.transforms import pad_batch


class _Pull:
    """One loss's gradient against the labels' (p - y), summed over images."""

    def __init__(self):
        self.dot = self.sq = self.on_positives = self.against = 0.0

    def add(self, grad, label, positive) -> None:
        self.dot += float((grad * label).sum())
        self.sq += float((grad * grad).sum())
        self.on_positives += float((grad[positive] ** 2).sum())
        self.against += float((grad[grad * label < 0] ** 2).sum())


def _logit_grad(loss_of, student_logits):
    """d sum(loss_of(s)) / d s at the student's logits, [A, K] float64 (each entry's own gradient)."""
    with torch.enable_grad():
        s = student_logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(s).sum(), s)
    return grad


@torch.no_grad()
def compare(teacher, student, dataset, images: int) -> dict:
    """Sums over ``images`` images of ``dataset``; see the module docstring for the keys."""
    layout = teacher.layout
    n_pos = n_miss = n_false = 0
    q_pos_sum = gap = label_sq = 0.0
    kd_pull, adl_pull, wce_pull = _Pull(), _Pull(), _Pull()
    count = min(images, len(dataset))
    for index in range(count):
        sample = dataset[index]
        x, _ = pad_batch([sample["image"]], [sample["padded_size"]])  # padded alone, as the dump does
        t_logits, s_logits = teacher(x)[0][0].double(), student(x)[0][0].double()  # [A, K]
        q, p = torch.sigmoid(t_logits), torch.sigmoid(s_logits)
        matched = match_anchors(layout.anchors(sample["padded_size"]), sample["boxes"], sample["iscrowd"])
        y = torch.zeros_like(q)
        fg = matched >= 0
        y[fg, sample["labels"][matched[fg]]] = 1.0
        keep = (matched != IGNORED)[:, None].expand_as(q)
        pos = (y == 1) & keep
        n_pos += int(pos.sum())
        q_pos_sum += float(q[pos].sum())
        n_miss += int((q[pos] < 0.5).sum())
        n_false += int(((q >= 0.5) & (y == 0) & keep).sum())
        gap += float((q - y).abs()[keep].sum())
        label = (p - y)[keep]
        label_sq += float((label * label).sum())
        kd_pull.add((p - q)[keep], label, y[keep] == 1)  # plain KD's gradient w.r.t. the logits
        adl_grad = _logit_grad(lambda s: losses.adaptive_distillation_loss(s, t_logits, beta=1.0, gamma=2.0), s_logits)
        adl_pull.add(adl_grad[keep], label, y[keep] == 1)
        wce_grad = _logit_grad(lambda s: losses.weighted_soft_cross_entropy(s, t_logits, background_weight=1.5), s_logits)
        wce_pull.add(wce_grad[keep], label, y[keep] == 1)
    cosine = kd_pull.dot / math.sqrt(kd_pull.sq * label_sq)
    pulls = {"kd": kd_pull, "adl": adl_pull, "wce": wce_pull}
    return {
        "images": count,
        "positive_entries_per_image": n_pos / count,
        "teacher_q_at_positives": q_pos_sum / n_pos,
        "teacher_misses": n_miss / n_pos,
        "teacher_false_per_image": n_false / count,
        "target_gap": gap / n_pos,
        "kd_label_cosine": cosine,
        "kd_beyond_labels": math.sqrt(max(0.0, 1.0 - cosine**2)),
        "student_to_teacher_over_student_to_labels": math.sqrt(kd_pull.sq / label_sq),
        "adl_label_cosine": adl_pull.dot / math.sqrt(adl_pull.sq * label_sq),
        "wce_label_cosine": wce_pull.dot / math.sqrt(wce_pull.sq * label_sq),
        **{f"{name}_grad_on_positives": pull.on_positives / pull.sq for name, pull in pulls.items()},
        **{f"{name}_grad_against_labels": pull.against / pull.sq for name, pull in pulls.items()},
    }


def shares(r: dict, what: str) -> str:
    """e.g. '48 % / 92 % / 25 %': KD's, ADL's and weighted CE's share of their gradient's squared norm."""
    return " / ".join(f"{100 * r[f'{name}_grad_{what}']:.0f} %" for name in ("kd", "adl", "wce"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--images", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_settings(args.config, args.overrides)
    teacher, student = load_detector(args.teacher).eval(), load_detector(args.student).eval()
    if teacher.layout != student.layout or teacher.preprocess != student.preprocess:
        raise SystemExit("teacher and student differ in anchor layout or preprocessing; this comparison needs them equal")
    out = {}
    print("| split | images | positives / image | teacher q at positives | teacher misses (q < 0.5) | teacher false / image "
          "| target gap sum abs(q - y) / positives | cos(KD grad, label grad) | KD beyond labels | abs(p - q) / abs(p - y) "
          "| cos(ADL grad, label grad) | cos(Chen wCE grad, label grad) | KD / ADL / wCE grad on positives "
          "| KD / ADL / wCE grad against the labels |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for split in ("train", "val"):
        dataset = DetectionDataset(labeled_source(cfg.data, split), teacher.preprocess)
        r = out[split] = compare(teacher, student, dataset, args.images)
        print(f"| {split} | {r['images']} | {r['positive_entries_per_image']:.1f} | {r['teacher_q_at_positives']:.3f} | "
              f"{100 * r['teacher_misses']:.1f} % | {r['teacher_false_per_image']:.2f} | {r['target_gap']:.3f} | "
              f"{r['kd_label_cosine']:.3f} | {r['kd_beyond_labels']:.3f} | "
              f"{r['student_to_teacher_over_student_to_labels']:.3f} | {r['adl_label_cosine']:.3f} | "
              f"{r['wce_label_cosine']:.3f} | " + shares(r, "on_positives") + " | " + shares(r, "against_labels") + " |",
              flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
