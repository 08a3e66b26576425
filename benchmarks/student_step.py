"""Student step time and peak memory: the student alone vs SAD from the cache vs online distillation.

Three modes, each run by the real ``sadpipe.tasks.distill.train_student`` at the config's student batch
size and resolution:
  (a) none:   the student alone (focal + box loss, labeled images only);
  (b) sad:    SAD with soft targets read from the teacher cache (``--cache``);
  (c) online: SAD with the teacher in the loop (``distill.online_teacher=--teacher``): one teacher
              forward per step instead of the cache read.
A step is timed from one batch's arrival to the next (the loop's ``on_batch`` hook), so it holds data loading (and the cache
read), forward, backward and the optimiser; the first ``--warmup`` steps are dropped and the median
step is reported. Every run is its own subprocess so that peak memory is per mode: on CPU the
growth of the process's peak RSS (``ru_maxrss``) from just before ``train_student`` to the end
(DataLoader worker processes not included), on CUDA ``torch.cuda.max_memory_allocated``. The
machine is shared: modes are interleaved (rotated order) over ``--repeats`` rounds and the table
shows medians over rounds, with the spread of the step time.

With ``--compare-layout`` the rounds instead interleave modes (a) and (b) with the student's conv
weights contiguous and channels-last (``student.train.channels_last``), and the table gives the
channels-last step time as a fraction of the contiguous one.

Example:
  python benchmarks/student_step.py --config pipelines/toy.toml --cache runs/toy_cache.zarr \\
      --teacher runs/toy_teacher/final.pt --steps 30 --set data.root=data/toy
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("none", "sad", "online")
LABELS = {"none": "(a) student alone", "sad": "(b) SAD from cache", "online": "(c) SAD, online teacher"}


def worker(args) -> dict:
    """Run one mode in this process; return its measurements."""
    import torch

    from sadpipe.engine.loop import Hooks
    from sadpipe.settings import load_settings
    from sadpipe.tasks.distill import train_student

    torch.set_num_threads(args.threads)
    overrides = list(args.set) + [f"distill.method={'none' if args.worker == 'none' else 'sad'}"]
    if args.worker == "online":
        overrides.append(f"distill.online_teacher={json.dumps(str(args.teacher))}")
    cfg = load_settings(args.config, overrides)
    cache = args.cache if args.worker == "sad" else None
    stamps: list[float] = []
    hooks = Hooks(on_batch=lambda step, batch: stamps.append(time.perf_counter()))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with tempfile.TemporaryDirectory() as out:
        train_student(cfg, cache, Path(out) / "run", device=args.device, max_steps=args.warmup + args.steps + 1,
                      evaluate=False, hooks=hooks)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    return {
        "mode": args.worker, "batch_size": cfg.student.train.batch_size,
        "step_ms": 1000 * statistics.median(steps), "steps": len(steps),
        "peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if cuda else (rss_after - rss_before) / 1024,
        "peak_rss_mb": rss_after / 1024,
        # DataLoader workers (where the cache is read and decoded), largest one, once they have exited
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "memory": "cuda max_memory_allocated" if cuda else "CPU ru_maxrss growth",
    }


def run_mode(args, mode: str, extra_sets: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--config", str(args.config), "--cache", str(args.cache),
           "--teacher", str(args.teacher), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device]
    for s in [*args.set, *extra_sets]:
        cmd += ["--set", s]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"mode {mode} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def compare_layout(args) -> None:
    """Step time of (a) and (b) with the student's conv weights contiguous vs channels-last, interleaved."""
    layouts = {"contiguous": ("student.train.channels_last=false",), "channels-last": ("student.train.channels_last=true",)}
    runs = [(mode, layout) for mode in ("none", "sad") for layout in layouts]
    step_ms: dict[tuple, list[float]] = {r: [] for r in runs}
    for r in range(args.repeats):
        for mode, layout in runs[r % len(runs):] + runs[:r % len(runs)]:
            res = run_mode(args, mode, layouts[layout])
            step_ms[(mode, layout)].append(res["step_ms"])
            print(f"round {r + 1}/{args.repeats} {mode:5s} {layout:13s} {res['step_ms']:8.1f} ms/step", file=sys.stderr)
    print(f"\nstudent step, {args.steps} timed steps x {args.repeats} rounds (medians), {args.threads} thread(s)")
    print("| mode | contiguous ms/step | channels-last ms/step | channels-last / contiguous (per round, median) |")
    print("|---|---|---|---|")
    for mode in ("none", "sad"):
        c, cl = step_ms[(mode, "contiguous")], step_ms[(mode, "channels-last")]
        ratio = statistics.median(b / a for a, b in zip(c, cl))
        print(f"| {LABELS[mode]} | {statistics.median(c):.1f} | {statistics.median(cl):.1f} | {ratio:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="teacher cache (dump-teacher) for mode (b)")
    ap.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint for mode (c)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the three modes (order rotated)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (shared machine)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--compare-layout", action="store_true",
                    help="time (a) and (b) with contiguous vs channels-last conv weights, side by side")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.compare_layout:
        compare_layout(args)
        return

    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            res = run_mode(args, mode)
            results[mode].append(res)
            print(f"round {r + 1}/{args.repeats} {mode:7s} {res['step_ms']:8.1f} ms/step  {res['peak_mb']:8.1f} MB",
                  file=sys.stderr)

    med = {m: {k: statistics.median(x[k] for x in results[m]) for k in ("step_ms", "peak_mb", "peak_rss_mb", "worker_rss_mb")}
           for m in MODES}
    batch = results["none"][0]["batch_size"]
    print(f"\nstudent step, batch {batch}, {args.steps} timed steps x {args.repeats} rounds (medians), "
          f"{args.threads} thread(s), memory = {results['none'][0]['memory']}")
    print("| mode | ms/step | step range over rounds | images/s | peak memory MB | peak RSS MB | worker peak RSS MB | time vs (a) | memory vs (a) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in MODES:
        steps = [x["step_ms"] for x in results[m]]
        print(f"| {LABELS[m]} | {med[m]['step_ms']:.1f} | {min(steps):.1f}-{max(steps):.1f} | "
              f"{1000 * batch / med[m]['step_ms']:.1f} | {med[m]['peak_mb']:.0f} | {med[m]['peak_rss_mb']:.0f} | {med[m]['worker_rss_mb']:.0f} | "
              f"{med[m]['step_ms'] / med['none']['step_ms']:.2f} | "
              f"{med[m]['peak_mb'] / max(1e-9, med['none']['peak_mb']):.2f} |")


if __name__ == "__main__":
    main()
