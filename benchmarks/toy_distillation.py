"""The toy distillation benchmark: every method, several seeds, cached and online teachers.

Each run is one `sadpipe train-student` process (so every run saves its resolved config, can be
resumed, and `--jobs 2` trains two students side by side with one torch thread each). A run is
done when its `eval.json` exists; an interrupted run resumes from its `train_state.pt`; so the
command can be repeated until everything is done, and `--only` picks methods.

    python benchmarks/toy_distillation.py --config toy_paper_regime --data-root data/toy \\
        --teacher runs/confident_teacher/final.pt --cache runs/paper_regime/cache.zarr \\
        --workdir runs/paper_regime/bench --seeds 0,1,2 --jobs 2

`--online` adds plain KD, ADL and SAD with the teacher run live every step instead of the cache
(same seeds: the cache must not change the outcome). `--sweep` trains the sweep grid (SWEEP
below) with `data.tune_holdout=0.2`: weights and thresholds are chosen on held-out labeled train
images, never on val. The cache must hold the teacher's box regression for the bounded-regression
baseline (`sadpipe dump-teacher --with-box-regression`).

Writes WORKDIR/benchmark.md (table: mean +- std over seeds, the paired same-seed difference to the
student alone, % of the teacher's mAP; the sweep's results), benchmark.json and map_curves.png
(val mAP over steps per method, mean over seeds; needs `student.train.eval_every_epochs` > 0).

`--results DIR` keeps a small record of every finished run (its metrics, val mAP curve, resolved
config and provenance: a digest of the teacher's weights, of the toy annotations and of the cache's
image plan) in DIR, a directory meant to be committed, and writes the report there too. A run with
a record counts as done even when its run directory is gone (a new machine, a cleaned disk), so a
benchmark of many CPU hours can be finished over several sessions; a record whose provenance differs
from the current teacher, data or cache is refused, never mixed into the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> overrides. "SELF" is replaced by the teacher's model table (self-distillation).
METHODS = {
    "student alone": ['distill.method="none"'],
    "plain KD": ['distill.method="kd"'],
    "FDL (beta=0)": ['distill.method="fdl"'],
    "ADL (labeled)": ['distill.method="adl"'],
    "SAD (labeled + unlabeled)": ['distill.method="sad"'],
    # the released code's SAD: unlabeled images also get the hard loss against the teacher's detections
    "SAD + pseudo-labels (released code)": ['distill.method="sad"', "distill.pseudo_labels=true"],
    "data distillation": ['distill.method="data_distillation"'],
    "self-distillation (teacher arch, SAD)": ['distill.method="sad"', "SELF"],
    # the teacher's architecture on the student's budget and no teacher: what self-distillation adds
    "teacher arch alone": ['distill.method="none"', "SELF"],
    "Chen: weighted soft CE": ['distill.method="weighted_ce"'],
    "Chen: bounded regression": ['distill.method="none"', "distill.bounded_regression_weight=0.5"],
}
ONLINE = ["plain KD", "ADL (labeled)", "SAD (labeled + unlabeled)"]
# method -> list of (label, overrides) tried on the tuning hold-out, seed 0
SWEEP = {
    "plain KD": [(f"loss_weight={w}", [f"distill.loss_weight={w}"]) for w in (0.5, 2, 8)],
    # ADL's grid goes one step further: its best on the confident teacher was 8, the edge of the first grid
    "ADL (labeled)": [(f"loss_weight={w}", [f"distill.loss_weight={w}"]) for w in (0.5, 2, 8, 32)],
    "Chen: weighted soft CE": [(f"hard_weight={m}", [f"distill.hard_weight={m}"]) for m in (0.25, 0.5, 0.75)],
    "Chen: bounded regression": [(f"margin={m}", [f"distill.bounded_regression_margin={m}"]) for m in (0.0, 0.1)],
    # 0.8: the best of 0.4 and 0.6 on the confident teacher was 0.6, the edge of the first grid
    "data distillation": [(f"pseudo_score_thresh={t}", [f"distill.pseudo_score_thresh={t}"]) for t in (0.4, 0.6, 0.8)],
    # no setting to choose: the reference that says what each loss adds on the hold-out
    "student alone": [("reference", [])],
}

# methods that use a swept method's loss, and so its chosen setting
# (FDL is ADL with beta = 0: at ADL's weight the two differ only in the adaptive term, the paper's ablation)
SWEEP_SHARED = {
    "ADL (labeled)": ["FDL (beta=0)", "SAD (labeled + unlabeled)", "SAD + pseudo-labels (released code)",
                      "self-distillation (teacher arch, SAD)"],
    "data distillation": ["SAD + pseudo-labels (released code)"],
}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_").replace("__", "_")


def teacher_model_overrides(teacher: Path) -> list[str]:
    """The student takes the teacher's architecture (self-distillation), read from its checkpoint."""
    import torch
    spec = torch.load(teacher, map_location="cpu", weights_only=True)["spec"]
    return [f'student.model.arch="{spec["arch"]}"', f"student.model.fpn_channels={spec['fpn_channels']}",
            f'student.model.head_norm="{spec["head_norm"]}"', f'student.model.backbone_norm="{spec["backbone_norm"]}"']


def weights_digest(checkpoint: Path) -> str:
    """sha256 over a checkpoint's tensors (names, dtypes, shapes, bytes in name order): unlike the
    file's sha256 it does not depend on how torch.save laid out the file, so two sessions that
    retrain the same teacher deterministically get the same digest."""
    import torch
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def machine() -> dict:
    """Where a run was trained (for the reader of a record; not part of the provenance check)."""
    import platform
    import torch
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count()}


def provenance(teacher: Path, data_root: Path, cache: Path) -> dict:
    """What a run's result depends on besides its own config: the teacher, the data, the cache."""
    from sadpipe.cache.reader import read_store_metadata
    files = ["train/annotations.json", "val/annotations.json", "unlabeled/image_info.json"]
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"|" + (data_root / rel).read_bytes())
    meta = read_store_metadata(str(cache))[0]
    return {"teacher_weights_sha256": weights_digest(teacher), "data_sha256": h.hexdigest(),
            "cache_plan_sha256": meta.get("plan_sha256"),
            "cache_codec_sha256": hashlib.sha256(json.dumps(meta.get("codec"), sort_keys=True).encode()).hexdigest()}


def portable(text: str, places: dict[str, str]) -> str:
    """``text`` with this machine's paths replaced by names (``places``: path -> DATA, TEACHER, ...),
    longest path first so a path inside another is not half-replaced."""
    for path, name in sorted(places.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text


class Run:
    def __init__(self, workdir: Path, method: str, seed: int, overrides: list[str], *, group: str = "table",
                 label: str = "", results: Path | None = None):
        self.method, self.seed, self.overrides, self.group, self.label = method, seed, overrides, group, label
        name = slug(method) + (f"_{slug(label)}" if label else "")
        self.dir = workdir / group / f"{name}_seed{seed}"
        self.log = workdir / "logs" / group / f"{name}_seed{seed}.log"
        self.record = results / group / f"{name}_seed{seed}.json" if results else None

    @property
    def trained(self) -> bool:
        return (self.dir / "eval.json").is_file()

    @property
    def done(self) -> bool:
        return self.trained or bool(self.record and self.record.is_file())

    def result(self) -> dict:
        if self.record and self.record.is_file():
            keys = ("method", "label", "seed", "metrics", "curve")
            return {k: v for k, v in json.loads(self.record.read_text()).items() if k in keys}
        log = [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines() if line]
        final = json.loads((self.dir / "eval.json").read_text())["metrics"]
        # the periodic evaluations, then the final one at the last step
        curve = [(r["step"], r["eval"]["AP"]) for r in log if "eval" in r]
        curve.append((max((r["step"] for r in log), default=0), final["AP"]))
        return {"method": self.method, "label": self.label, "seed": self.seed, "metrics": final, "curve": curve}

    def check_record(self, prov: dict) -> None:
        """Refuse a record made with another teacher, data or cache: its mAP is not comparable."""
        if not (self.record and self.record.is_file()):
            return
        saved = json.loads(self.record.read_text()).get("provenance", {})
        diff = [k for k in prov if saved.get(k) != prov[k]]
        if diff:
            raise SystemExit(f"{self.record}: made with a different {', '.join(diff)} than this benchmark's "
                             f"({', '.join(f'{k}: {str(saved.get(k))[:12]} vs {str(prov[k])[:12]}' for k in diff)}); "
                             "give another --results directory, or delete the records to retrain")

    def write_record(self, prov: dict, command: list[str], places: dict[str, str]) -> None:
        """Keep what the table needs once the run directory is gone (written once, atomically).
        ``places`` maps this machine's paths to names (DATA, TEACHER, ...), so a record says
        which input it used without naming a directory that exists only here."""
        if not self.record or self.record.is_file() or not self.trained:
            return
        rec = {**self.result(), "overrides": [portable(o, places) for o in self.overrides], "provenance": prov,
               "command": portable(shlex.join(command), places),
               "config_resolved": portable((self.dir / "config.resolved.toml").read_text(), places),
               "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine()}
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        tmp.replace(self.record)


def train(run: Run, args, base_sets: list[str], prov: dict | None, places: dict[str, str]) -> None:
    if run.done:
        return
    resume = (run.dir / "train_state.pt").is_file()
    if run.dir.exists() and not resume:
        shutil.rmtree(run.dir)  # started but never checkpointed: nothing to keep
    run.log.parent.mkdir(parents=True, exist_ok=True)
    sets = [*base_sets, f"student.train.seed={run.seed}", *run.overrides]
    cmd = [sys.executable, "-m", "sadpipe", "train-student", "--config", args.config, "--out", str(run.dir),
           "--device", args.device, "--cache", str(args.cache)]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    with open(run.log, "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    status = "done" if code == 0 else f"FAILED (exit {code}, see {run.log})"
    print(f"[{time.strftime('%H:%M:%S')}] {run.group}/{run.dir.name}: {status} in {time.perf_counter() - t:.0f} s",
          flush=True)
    if prov is not None:
        run.write_record(prov, cmd, places)  # at once: a session may end before the benchmark does


def parse_method_set(item: str) -> tuple[str, str]:
    """'METHOD:KEY=VALUE' -> (METHOD, 'KEY=VALUE'); METHOD may hold colons ('Chen: weighted soft CE'),
    so the split is at the first colon followed by a config key and '='."""
    match = re.match(r"^(.+?):\s*([A-Za-z_][\w.]*=.*)$", item)
    if not match:
        raise SystemExit(f"--method-set wants METHOD:KEY=VALUE, got {item!r}")
    return match.group(1), match.group(2)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def same_sign(diffs: list[float]) -> str:
    """' (every seed)' when two or more paired differences all lie on one side of zero."""
    return " (every seed)" if len(diffs) > 1 and (min(diffs) > 0 or max(diffs) < 0) else ""


def paired_diff(runs: dict[int, dict], alone: dict[int, dict], key: str) -> str:
    """Mean +- std over the seeds both have of 100 x (metric ``key`` of ``runs`` - of ``alone``)."""
    diff = [100 * (runs[s]["metrics"][key] - alone[s]["metrics"][key]) for s in sorted(runs) if s in alone]
    return mean_std(diff) + same_sign(diff)


def table(results: list[dict], teacher_ap: float | None) -> str:
    by_method: dict[str, dict[int, dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    alone = by_method.get("student alone", {})
    lines = ["| method | seeds | val mAP (%) | AP50 (%) | paired diff. to student alone (mAP) | paired diff. (AP50) "
             "| % of teacher |",
             "|---|---|---|---|---|---|---|"]
    for method, runs in by_method.items():
        aps = [100 * runs[s]["metrics"]["AP"] for s in sorted(runs)]
        ap50 = [100 * runs[s]["metrics"]["AP50"] for s in sorted(runs)]
        pct = f"{100 * statistics.mean(aps) / teacher_ap:.0f} %" if teacher_ap else "-"
        label = next(iter(runs.values()))["label"]
        name = f"{method} ({label})" if label else method
        # AP50 beside mAP: a gain at loose IoU paid for at strict IoU leaves mAP flat
        ap_diff, ap50_diff = ("-", "-") if method == "student alone" else \
            (paired_diff(runs, alone, "AP"), paired_diff(runs, alone, "AP50"))
        lines.append(f"| {name} | {len(aps)} | {mean_std(aps)} | {mean_std(ap50)} | {ap_diff} | {ap50_diff} | {pct} |")
    if not alone:
        # a results directory of one method's variant (e.g. another cache) is compared by hand
        lines.append("\n(No student-alone run in this results directory, so no paired differences.)")
    return "\n".join(lines)


def online_table(results: list[dict]) -> str:
    """Per method with both: online minus cached mAP, same seeds, next to the cached runs' seed std."""
    by = {(r["method"], r["seed"]): 100 * r["metrics"]["AP"] for r in results}
    lines = ["| method | seeds | online - cached (mAP, paired) | std of the cached runs over seeds |", "|---|---|---|---|"]
    for m in ONLINE:
        seeds = sorted(seed for (name, seed) in by if name == f"{m}, online teacher" and (m, seed) in by)
        if not seeds:
            continue
        diff = [by[(f"{m}, online teacher", s)] - by[(m, s)] for s in seeds]
        cached = [v for (name, _), v in by.items() if name == m]
        spread = f"{statistics.stdev(cached):.2f}" if len(cached) > 1 else "-"
        lines.append(f"| {m} | {len(seeds)} | {mean_std(diff)} | {spread} |")
    return "\n".join(lines)


# the paper's claims (Tang et al. 2021, Table 1-3) as (claim, better method, other method)
CLAIMS = [
    ("KD > none", "plain KD", "student alone"),
    ("ADL > KD", "ADL (labeled)", "plain KD"),
    ("ADL > none", "ADL (labeled)", "student alone"),
    ("ADL > FDL", "ADL (labeled)", "FDL (beta=0)"),  # the paper's ablation of the entropy term
    ("SAD > ADL", "SAD (labeled + unlabeled)", "ADL (labeled)"),
    ("SAD > data distillation", "SAD (labeled + unlabeled)", "data distillation"),
    # the released code's SAD is data distillation plus ADL: the claim as its code tests it
    ("SAD (released code) > data distillation", "SAD + pseudo-labels (released code)", "data distillation"),
    ("SAD (released code) > ADL", "SAD + pseudo-labels (released code)", "ADL (labeled)"),
    # a student as large as its teacher: the gain over the same network trained alone on the same budget
    ("self-distillation > teacher arch alone", "self-distillation (teacher arch, SAD)", "teacher arch alone"),
]
SAD_METHODS = ("SAD (labeled + unlabeled)", "SAD + pseudo-labels (released code)", "self-distillation (teacher arch, SAD)")


def claims_table(results: list[dict], teacher_ap: float | None) -> str:
    """The paper's claims as paired (same-seed) differences of val mAP, and SAD against the teacher."""
    by = {(r["method"], r["seed"]): 100 * r["metrics"]["AP"] for r in results}
    lines = ["| claim | seeds | paired difference (mAP) | holds on every seed |", "|---|---|---|---|"]
    for claim, better, other in CLAIMS:
        seeds = sorted(seed for (name, seed) in by if name == better and (other, seed) in by)
        if not seeds:
            continue
        diff = [by[(better, s)] - by[(other, s)] for s in seeds]
        lines.append(f"| {claim} | {len(seeds)} | {mean_std(diff)} | {'yes' if min(diff) > 0 else 'no'} |")
    for method in SAD_METHODS:
        sad = [v for (name, _), v in by.items() if name == method]
        if sad and teacher_ap:
            gap = [v - teacher_ap for v in sad]
            lines.append(f"| {method} student >= teacher ({teacher_ap:.2f}) | {len(sad)} | {mean_std(gap)} "
                         f"| {'yes' if min(gap) >= 0 else 'no'} |")
    return "\n".join(lines)


def sweep_choices(results: list[dict]) -> dict[str, dict]:
    """Per swept method, its run with the best hold-out mAP."""
    best: dict[str, dict] = {}
    for r in results:
        if r["method"] not in best or r["metrics"]["AP"] > best[r["method"]]["metrics"]["AP"]:
            best[r["method"]] = r
    return best


def sweep_table(results: list[dict]) -> str:
    best = sweep_choices(results)
    lines = ["| method | setting | hold-out mAP (%) |", "|---|---|---|"]
    for r in results:
        mark = " (best)" if best[r["method"]] is r and len(SWEEP.get(r["method"], [])) > 1 else ""
        lines.append(f"| {r['method']} | {r['label']}{mark} | {100 * r['metrics']['AP']:.2f} |")
    # the table and online runs take the best settings with --method-set METHOD:KEY=VALUE
    flags = [f"--method-set '{name}:{o}'" for m, r in best.items() for label, sets in SWEEP[m] if label == r["label"]
             for o in sets for name in [m, *SWEEP_SHARED.get(m, [])]]
    return "\n".join(lines) + "\n\nThe best settings, for the table and online runs: " + " ".join(flags)


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_method: dict[str, list[list]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r["curve"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, curves in by_method.items():
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        means = [statistics.mean(dict(c)[s] * 100 for c in curves) for s in steps]
        ax.plot(steps, means, marker="o", ms=3, label=f"{method} ({len(curves)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("val mAP (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="toy_paper_regime", help="pipeline TOML or shipped pipeline name")
    ap.add_argument("--data-root", required=True, help="data.root of the toy data (sadpipe make-toy-data)")
    ap.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (for self-distillation, online runs)")
    ap.add_argument("--cache", type=Path, required=True, help="the teacher's cache (dump-teacher --with-box-regression)")
    ap.add_argument("--workdir", type=Path, required=True, help="run directories (checkpoints) and logs")
    ap.add_argument("--results", type=Path, default=None,
                    help="keep a record of every finished run here and write the report here (a directory to "
                         "commit); runs with a record are not retrained")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="", help="comma-separated method names (prefix match)")
    ap.add_argument("--online", action="store_true", help="also train KD / ADL / SAD with the live teacher")
    ap.add_argument("--sweep", action="store_true", help="also train the sweep grid on the tuning hold-out")
    ap.add_argument("--report-only", action="store_true", help="write the report from finished runs, train nothing")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every run")
    ap.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="an override for the methods whose name starts with METHOD (e.g. the sweep's choice: "
                         "'ADL:distill.loss_weight=2'), table and online runs; it becomes part of the run's "
                         "name and directory; repeatable")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained side by side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base_sets = [f"data.root={json.dumps(str(Path(args.data_root).resolve()))}", *args.overrides]

    def picked(method: str) -> bool:
        # a prefix, so that "SAD" names SAD and not "self-distillation (teacher arch, SAD)"
        return not args.only or any(o.strip() and method.startswith(o.strip()) for o in args.only.split(","))

    def expand(sets: list[str]) -> list[str]:
        return [x for s in sets for x in (teacher_model_overrides(args.teacher) if s == "SELF" else [s])]

    def chosen(method: str) -> list[str]:
        out = []
        for item in args.method_set:
            name, assignment = parse_method_set(item)
            out += [assignment] if method.startswith(name) else []
        return out

    def chosen_label(method: str) -> str:
        # the choices name the run (and its directory), so a run trained with other settings is never reused
        return " ".join(a.removeprefix("distill.") for a in chosen(method))

    # every run the options can name; the report shows all finished ones, training takes the picked ones
    rec = {"results": args.results}
    table_runs = [Run(work, m, seed, expand(sets) + chosen(m), label=chosen_label(m), **rec)
                  for seed in seeds for m, sets in METHODS.items()]
    online_runs = [Run(work, f"{m}, online teacher", seed,
                       expand(METHODS[m]) + chosen(m) + [f"distill.online_teacher={json.dumps(str(args.teacher.resolve()))}"],
                       group="online", label=chosen_label(m), **rec)
                   for seed in seeds for m in ONLINE]
    sweep_runs = [Run(work, m, 0, expand(METHODS[m]) + sets + ["data.tune_holdout=0.2"], group="sweep", label=label, **rec)
                  for m, grid in SWEEP.items() for label, sets in grid]
    every = sweep_runs + table_runs + online_runs
    prov = None
    places = {str(Path(args.data_root).resolve()): "DATA", str(args.teacher.resolve()): "TEACHER",
              str(args.teacher): "TEACHER", str(args.cache.resolve()): "CACHE", str(args.cache): "CACHE",
              str(work.resolve()): "WORKDIR", str(work): "WORKDIR", sys.executable: "python"}
    if args.results:
        repo = Path(__file__).resolve().parents[1]
        res = args.results.resolve()
        places[str(res)] = str(res.relative_to(repo)) if res.is_relative_to(repo) else "RESULTS"
        prov = provenance(args.teacher, Path(args.data_root), args.cache)
        for r in every:
            r.check_record(prov)
    wanted = ([r for r in sweep_runs if args.sweep] + table_runs + [r for r in online_runs if args.online])
    todo = [r for r in wanted if picked(r.method.split(", online")[0]) and not r.done]
    if not args.report_only and todo:
        print(f"{len(todo)} runs to train ({args.jobs} at a time)", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda r: train(r, args, base_sets, prov, places), todo))

    results = [r.result() for r in table_runs + online_runs if r.done]
    sweep = [r.result() for r in sweep_runs if r.done]
    teacher_eval = args.teacher.parent / "eval.json"
    teacher_ap = 100 * json.loads(teacher_eval.read_text())["metrics"]["AP"] if teacher_eval.is_file() else None
    text = (f"# Toy distillation benchmark\n\nCommand: `python benchmarks/{Path(__file__).name} "
            + shlex.join(sys.argv[1:] if argv is None else argv) + "`\n\n"
            + (f"Teacher val mAP: {teacher_ap:.2f}\n\n" if teacher_ap else "")
            + table(results, teacher_ap) + "\n")
    claims = claims_table(results, teacher_ap)
    if claims.count("\n") > 1:
        text += "\n## The paper's claims, paired by seed\n\n" + claims + "\n"
    if any(", online teacher" in r["method"] for r in results):
        text += "\n## The live teacher instead of the cache\n\n" + online_table(results) + "\n"
    if sweep:
        text += "\n## Sweep on the tuning hold-out (20 % of the labeled train images, seed 0)\n\n" + sweep_table(sweep) + "\n"
    out = args.results or work
    out.mkdir(parents=True, exist_ok=True)
    if results:
        plot_curves(results, out / "map_curves.png")
        text += "\n![val mAP over steps](map_curves.png)\n"
    text = portable(text, places)
    (out / "benchmark.md").write_text(text)
    (out / "benchmark.json").write_text(json.dumps({"table": results, "sweep": sweep}, indent=2))
    print(text)
    missing = [r for r in wanted if picked(r.method.split(", online")[0]) and not r.done]
    if missing:
        print(f"{len(missing)} runs not finished: rerun the same command to continue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
