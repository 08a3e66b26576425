"""The toy distillation benchmark: teacher vs students trained alone and with each distillation method.

One command (CPU, roughly 10 minutes per student run on a quiet 2-core machine for the
self-distillation run, 2-3 minutes for the tiny student):

    python benchmarks/toy_distillation.py --workdir runs/toy_bench --seeds 0,1

It reuses the demo's stages 1-3 in the work directory (toy data, teacher, teacher cache; done
stages are skipped, so pointing --workdir at a finished `sadpipe demo` work directory reuses its
teacher and cache), then trains, per seed, the student alone, plain KD, ADL on labeled images and SAD, and
once (seed 0) focal-style distillation, data distillation and self-distillation
(student architecture = teacher architecture, SAD). It prints a table of mean +- std over seeds
and writes it to WORKDIR/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from sadpipe.demo import has_state, prepare_teacher_and_cache, run_stage, toy_config
from sadpipe.distill import train_student

# name -> (config overrides, seeded?)
RUNS = {
    "student alone": (['distill.method="none"'], True),
    "student + plain KD": (['distill.method="kd"'], True),
    "student + FDL (beta=0)": (['distill.method="fdl"'], False),
    "student + ADL (labeled)": (['distill.method="adl"'], True),
    "student + SAD (labeled + unlabeled)": (['distill.method="sad"'], True),
    "student + data distillation": (['distill.method="data_distillation"'], False),
    "self-distillation (teacher arch, SAD)": (['distill.method="sad"', "SELF"], False),
}


def self_distillation_overrides(cfg: dict) -> list[str]:
    """The student takes the teacher's model table (same architecture as the teacher)."""
    m = cfg["teacher"]["model"]
    return [f'student.model.arch="{m["arch"]}"', f"student.model.fpn_channels={m['fpn_channels']}",
            f'student.model.head_norm="{m["head_norm"]}"', f'student.model.backbone_norm="{m["backbone_norm"]}"']


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/toy_bench"))
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds for the seeded runs")
    ap.add_argument("--only", default="", help="comma-separated run names (substring match) to run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    base = toy_config(work, args.overrides)
    teacher, _, cache = prepare_teacher_and_cache(work, base, args.device)
    results: dict[str, list[dict]] = {"teacher": [teacher]}
    for name, (extra, seeded) in RUNS.items():
        if args.only and not any(o.strip() in name for o in args.only.split(",")):
            continue
        if "SELF" in extra:
            extra = [e for e in extra if e != "SELF"] + self_distillation_overrides(base)
        for seed in (seeds if seeded else seeds[:1]):
            cfg = toy_config(work, [*args.overrides, *extra, f"student.train.seed={seed}"])
            tag = name.split("(")[0].strip().replace(" + ", "_").replace(" ", "_").replace("-", "_")
            needs_cache = cfg["distill"]["method"] != "none"
            summary = run_stage(work, f"{tag}_seed{seed}", f"{name}, seed {seed}",
                                lambda d, cfg=cfg, nc=needs_cache: train_student(
                                    cfg, cache if nc else None, d, device=args.device, resume=has_state(d)))
            results.setdefault(name, []).append(summary)

    table = format_table(results)
    print(table)
    (work / "benchmark.md").write_text(
        "# Toy distillation benchmark\n\n"
        f"Command: `python benchmarks/toy_distillation.py --workdir {work} --seeds {args.seeds}"
        + "".join(f" --set {o}" for o in args.overrides) + "`\n\n" + table + "\n")
    (work / "benchmark.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


def format_table(results: dict[str, list[dict]]) -> str:
    lines = ["| run | seeds | mAP (%) | AP50 (%) | params (M) | train s | train img/s |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        aps = [r["metrics"]["AP"] * 100 for r in runs]
        ap50 = [r["metrics"]["AP50"] * 100 for r in runs]

        def ms(v):
            return f"{statistics.mean(v):.2f} +- {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
        lines.append(f"| {name} | {len(runs)} | {ms(aps)} | {ms(ap50)} | {runs[0]['params'] / 1e6:.2f} | "
                     f"{statistics.mean(r['train_seconds'] for r in runs):.0f} | "
                     f"{statistics.mean(r['images_per_s'] for r in runs):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
