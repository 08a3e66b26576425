"""Teacher-dump throughput: the teacher's bare forward vs the whole dump, side by side.

For each DataLoader worker count it measures, over the same first N images of the dump plan:
  (a) bare: DataLoader (same images, views and batches as the dump) + teacher forward only;
  (b) dump: ``sadpipe.tasks.dump.dump_teacher(limit=N)`` (forward + encode + postprocess + zarr write
      on the background thread), loop time only (the codec fit is reported apart);
  (c) the ratio dump / bare (target >= 0.9);
and once (d) the read side: ms per image of ``TeacherCache.get`` (decode), per view.

Example:
  python benchmarks/dump_throughput.py --config pipelines/toy.toml --teacher runs/toy_teacher/final.pt \\
      --images 256 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from sadpipe.cache.reader import TeacherCache
from sadpipe.settings import load_settings
from sadpipe.tasks.dump import DumpImages, build_plan, dump_teacher, forward_batches
from sadpipe.models import load_detector


@torch.no_grad()
def bare_forward(cfg: dict, teacher, n: int, num_workers: int, views) -> tuple[float, float]:
    """(images/s, CPU ms per image of this process) of DataLoader + teacher forward over the
    first n plan images (the dump's batching)."""
    preprocess = cfg.geometry.preprocess
    plan = build_plan(cfg, n)
    per_shard = cfg.dump.images_per_shard
    batches = [list(range(s, min(s + per_shard, len(plan)))) for s in range(0, len(plan), per_shard)]
    loader = DataLoader(DumpImages(plan, preprocess, views), batch_sampler=batches, collate_fn=list,
                        num_workers=num_workers)
    bs = cfg.dump.batch_size
    start, cpu = time.perf_counter(), time.process_time()
    for items in loader:
        ok = [it for it in items if not it["failure"]]
        for view in views:
            # the dump's own grouping and batching, without encode, postprocess or write
            for _ in forward_batches(teacher, ok, view, torch.device("cpu"), batch_size=bs, amp=False):
                pass
    return len(plan) / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / len(plan)


def decode_ms(store: Path, views) -> dict:
    cache = TeacherCache(store)
    ids = cache.ok_image_ids()
    out = {}
    for view in views:
        for detections in (True, False):
            start = time.perf_counter()
            for image_id in ids:
                cache.get(image_id, view, detections=detections)
            out[view, detections] = 1e3 * (time.perf_counter() - start) / len(ids)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("pipelines/toy.toml"))
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--images", type=int, default=256, help="first N images of the dump plan")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated dump.num_workers values to try")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate bare/dump this many times per worker count")
    parser.add_argument("--keep", type=Path, default=None, help="write the store here instead of a temp dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_settings(args.config, args.overrides)
    views = tuple(cfg.dump.views)
    teacher = load_detector(args.teacher).eval()
    tmp = Path(tempfile.mkdtemp(prefix="dump_bench_"))
    store = args.keep or tmp / "cache.zarr"
    rows = []
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            cfg_w = load_settings(args.config, args.overrides + [f"dump.num_workers={w}"])
            bare, dump, fit = [], [], 0.0
            for _ in range(args.repeats):  # alternate so a busy neighbour hits both alike
                bare.append(bare_forward(cfg_w, teacher, args.images, w, views))
                cpu = time.process_time()
                summary = dump_teacher(cfg_w, args.teacher, store, device="cpu", overwrite=True, limit=args.images,
                                       log=lambda *a: None)
                cpu = time.process_time() - cpu  # includes the codec fit: subtract its share below
                fit = summary["fit_seconds"]
                dump.append((summary["images_per_s"], 1e3 * max(0.0, cpu - fit) / args.images))
            rows.append((w, max(bare), max(dump), fit))
        dec = decode_ms(store, views)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.images} images x views {list(views)}, teacher {teacher.spec['arch']} "
          f"({args.teacher}), batch {cfg.dump.batch_size}, {args.threads} torch thread(s), "
          f"images_per_shard {cfg.dump.images_per_shard}\n")
    print("| num_workers | bare forward img/s | dump img/s | dump / bare | bare CPU ms/img | dump CPU ms/img "
          "| codec fit s |")
    print("|---|---|---|---|---|---|---|")
    for w, (b, b_cpu), (d, d_cpu), fit in rows:
        print(f"| {w} | {b:.1f} | {d:.1f} | {d / b:.2f} | {b_cpu:.0f} | {d_cpu:.0f} | {fit:.1f} |")
    print("(best of --repeats runs; CPU ms is this process only: DataLoader workers are not counted)")
    print("\n| view | TeacherCache.get ms/image | without detections |")
    print("|---|---|---|")
    for view in views:
        print(f"| {view} | {dec[view, True]:.2f} | {dec[view, False]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
