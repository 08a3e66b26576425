"""Write the exact logits `benchmarks/codec_fidelity.py --inputs` measures the codecs on.

    python benchmarks/make_codec_inputs.py --config pipelines/toy.toml --teacher runs/demo/teacher/final.pt \
        --student runs/demo/student_alone/final.pt --out runs/codec_inputs/toy_teacher.pt

Takes the first N/2 labeled and N/2 unlabeled images of the config, runs the teacher, a freshly
initialised student (the config's [student.model]) and optionally a trained student on them, and
saves {"teacher_logits": float32 [N, A, K], "students": {name: float32 [N, A, K]}, "layout", "note"}.
All images must share one padded size (true for the toy data).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sadpipe.settings import load_settings
from sadpipe.data.dataset import DetectionDataset, collate, labeled_source, unlabeled_source
from sadpipe.models import load_detector
from sadpipe.tasks.supervised import build_model_for


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--student", type=Path, default=None, help="a trained student checkpoint (optional)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = load_settings(args.config, args.overrides)
    teacher = load_detector(args.teacher).eval()
    labeled, unlabeled = labeled_source(cfg.data, "train"), unlabeled_source(cfg.data)
    half = args.images // 2
    samples = [DetectionDataset(labeled, teacher.preprocess)[i] for i in range(half)]
    if unlabeled is not None:
        samples += [DetectionDataset(unlabeled, teacher.preprocess)[i] for i in range(args.images - half)]
    if len({s["padded_size"] for s in samples}) != 1:
        raise SystemExit("images of several padded sizes: this script needs one (the toy data has 128x128)")
    images = collate(samples)["images"]
    students = {"fresh": build_model_for(cfg, "student", labeled.categories).eval()}
    if args.student:
        students[args.student.parent.name or "trained"] = load_detector(args.student).eval()
    with torch.no_grad():
        out = {"teacher_logits": teacher(images)[0],
               "students": {name: model(images)[0] for name, model in students.items()},
               "layout": teacher.layout.to_dict(),
               "note": f"teacher {args.teacher}; {len(samples)} images ({half} labeled first); students {list(students)}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    q = torch.sigmoid(out["teacher_logits"])
    print(f"wrote {args.out}: {tuple(q.shape)}; max q {q.max():.3f}, share of q > 0.01: {(q > 0.01).float().mean():.3f}")


if __name__ == "__main__":
    main()
