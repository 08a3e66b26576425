"""Teacher targets at COCO geometry: the version-1 path beside the compact path, in one run.

The paper's geometry: a 480 x 800 image resized to 600 x 1000 is padded to 640 x 1024, which gives
122,760 anchors x 80 classes = 9.8 M values per image and view. For each teacher this prints, for
the version-1 path (dense uint8 codes per image, decoded to float32 in the DataLoader worker) and
for the compact path (sparse records read in the worker, decoded on the training device):

- stored bytes per image and view (zstd level 3 + crc32c, as the store writes them) and the ratio
  to dense float32;
- worker CPU ms per image (read + decompress + whatever the worker does before handing over);
- bytes per image crossing worker -> main process -> device;
- device-side decode ms per batch (CPU here: the decode the training step runs);
- ADL fidelity of the stored targets against the exact logits (gradient cosine, loss and
  normaliser error) for a fresh and a partly trained synthetic student; both paths decode to the
  same float32 values (checked), so the fidelity figures are the same for both.

Teachers: synthetic logits (background N(mu, sd) plus 2,000 hard entries N(1, 2) per image) of a
weak, a confident and a very confident teacher; with --teacher, a real sadpipe checkpoint run on
640 x 1024 canvases tiled from 128 px images (--images-dir), its K classes spread over 80 columns
by rolling the anchor axis (real per-entry statistics at the real shape), as it is and sharpened
x2 around logit(0.1) (a stand-in for a more confident teacher).

    python benchmarks/coco_scale.py --images 16
    python benchmarks/coco_scale.py --images 16 --teacher runs/teacher/final.pt --images-dir data/toy/val/images
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from sadpipe.cache import targets as tg
from sadpipe.cache.codec import default_codec
from sadpipe.cache.fidelity import adl_fidelity
from sadpipe.cache.format import ImageResult, StoreSpec, ViewResult
from sadpipe.cache.reader import TeacherCache
from sadpipe.cache.writer import StoreWriter

PADDED_HW = (640, 1024)
NUM_ANCHORS = 122_760  # 9 anchors x (80*128 + 40*64 + 20*32 + 10*16 + 5*8) cells of P3..P7
NUM_CLASSES = 80
HARD_ENTRIES = 2000
SYNTHETIC = {"weak": (-4.5, 1.2), "confident": (-7.0, 1.5), "very_confident": (-8.0, 1.0)}
FIT_VALUES_PER_IMAGE = 1 << 18  # as the dump's codec fit


def synthetic_logits(n: int, mu: float, sd: float, seed: int) -> torch.Tensor:
    """float32 [n, A, K]: background N(mu, sd) plus HARD_ENTRIES entries N(1, 2) per image."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, NUM_ANCHORS, NUM_CLASSES, generator=g) * sd + mu
    flat = z.view(n, -1)
    for i in range(n):
        flat[i, torch.randint(0, flat.shape[1], (HARD_ENTRIES,), generator=g)] = torch.randn(HARD_ENTRIES, generator=g) * 2 + 1
    return z


@torch.no_grad()
def real_teacher_logits(checkpoint: Path, images_dir: Path, n: int, seed: int) -> torch.Tensor:
    """float32 [n, A, 80] from a sadpipe checkpoint on 640 x 1024 canvases of 5 x 8 tiled images."""
    from sadpipe.data.images import read_image
    from sadpipe.models import load_detector

    model = load_detector(checkpoint).eval()
    pre = model.preprocess
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 40:
        raise SystemExit(f"{images_dir} has {len(files)} images; 40 are tiled into one canvas")
    rng = np.random.default_rng(seed)
    out = torch.empty(n, NUM_ANCHORS, NUM_CLASSES)
    for i in range(n):
        canvas = torch.zeros(1, 3, *PADDED_HW)
        for t, j in enumerate(rng.choice(len(files), size=40, replace=False)):
            x = pre(read_image(files[j]))[:, :128, :128]
            r, c = divmod(t, 8)
            canvas[0, :, r * 128 : r * 128 + x.shape[1], c * 128 : c * 128 + x.shape[2]] = x
        cls = model(canvas)[0][0].float()  # [A, K_model]
        if cls.shape[0] != NUM_ANCHORS:
            raise SystemExit(f"{checkpoint} gives {cls.shape[0]} anchors on 640 x 1024, not {NUM_ANCHORS}: "
                             "its anchor layout is not 5 levels x 9 anchors with strides 8..128")
        k = cls.shape[1]
        for start in range(0, NUM_CLASSES, k):  # column group j: the anchors rolled by a random shift
            width = min(k, NUM_CLASSES - start)
            out[i, :, start : start + width] = torch.roll(cls, int(rng.integers(NUM_ANCHORS)), dims=0)[:, :width]
    return out


def fit_codec(logits: torch.Tensor, seed: int):
    """default_codec refitted as the dump does: up to 8 images, 2^18 values per image."""
    g = torch.Generator().manual_seed(seed)
    rows = FIT_VALUES_PER_IMAGE // NUM_CLASSES
    sample = torch.stack([z[torch.randperm(NUM_ANCHORS, generator=g)[:rows].sort().values] for z in logits[:8]])
    return default_codec().fit(sample)


def store_spec(n: int, codec) -> StoreSpec:
    return StoreSpec(
        image_ids=list(range(1, n + 1)), splits=["labeled"] * n, paths=[f"img{i}.jpg" for i in range(n)],
        views=("orig",), num_classes=NUM_CLASSES, max_anchors=NUM_ANCHORS, num_levels=5, images_per_shard=n,
        max_detections=1, with_box_regression=False,
        metadata={"anchor_layout": {"benchmark": True}, "preprocessing": {}, "classes": {},
                  "teacher": {"arch": "synthetic"}, "codec": codec.to_dict()})


def write_compact_store(path: Path, codes: torch.Tensor, codec) -> None:
    n = codes.shape[0]
    spec = store_spec(n, codec)
    writer = StoreWriter.create_or_resume(path, spec)
    grid = np.array([[80, 128], [40, 64], [20, 32], [10, 16], [5, 8]], np.int32)
    results = [ImageResult(index=i, image_id=i + 1, orig_hw=(480, 800), resized_hw=(600, 1000), padded_hw=PADDED_HW,
                           grid_hw=grid, num_anchors=NUM_ANCHORS,
                           views={"orig": ViewResult(cls_codes=tg.compact_from_codes(codes[i]),
                                                     det_boxes=np.zeros((0, 4), np.float32),
                                                     det_scores=np.zeros(0, np.float32), det_labels=np.zeros(0, np.int64))})
               for i in range(n)]
    writer.write_shard(0, results)
    writer.finalize()


def write_v1_codes(path: Path, codes: torch.Tensor, level: int) -> zarr.Array:
    """The version-1 layout of cls codes: uint8 [N, A_max, K], one image per inner chunk, N per shard."""
    n = codes.shape[0]
    arr = zarr.create_array(path, shape=tuple(codes.shape), dtype="uint8", chunks=(1, NUM_ANCHORS, NUM_CLASSES),
                            shards=(n, NUM_ANCHORS, NUM_CLASSES), fill_value=0,
                            compressors=[ZstdCodec(level=level), Crc32cCodec()])
    arr[:] = codes.numpy()
    return arr


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


def best_ms(fn, repeats: int) -> float:
    """Median wall ms of fn() over repeats (one thread; the machine may be shared)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def measure(name: str, logits: torch.Tensor, args, workdir: Path) -> dict:
    n = logits.shape[0]
    codec = fit_codec(logits, args.seed)
    codes = codec.encode(logits)
    per_value = NUM_ANCHORS * NUM_CLASSES
    row = {"teacher": name, "images": n, "above_floor": float((codes > 0).float().mean())}

    # -- version 1: dense codes per image, decoded to float32 in the worker
    v1 = write_v1_codes(workdir / f"{name}_v1.zarr", codes, codec.zstd_level)
    v1_bytes = dir_bytes(workdir / f"{name}_v1.zarr") / n
    v1_worker = [best_ms(lambda i=i: codec.decode(v1[i]), args.repeats) for i in range(n)]
    row["v1"] = {"stored_bytes": v1_bytes, "ratio_to_float32": 4 * per_value / v1_bytes,
                 "worker_ms": float(np.mean(v1_worker)), "ipc_bytes": 4 * per_value, "device_decode_ms_per_batch": 0.0}

    # -- compact: records read in the worker, decoded on the device
    store = workdir / f"{name}_v2.zarr"
    write_compact_store(store, codes, codec)
    cache = TeacherCache(store)
    records = [cache.get_compact(i + 1) for i in range(n)]
    stored = dir_bytes(store / "views/orig/targets") / n
    worker = [best_ms(lambda i=i: cache.get_compact(i + 1), args.repeats) for i in range(n)]
    table = cache.code_table
    decode_batch = best_ms(lambda: [tg.decode(r, table) for r in records], args.repeats)
    row["compact"] = {"stored_bytes": stored, "ratio_to_float32": 4 * per_value / stored,
                      "worker_ms": float(np.mean(worker)), "worker_ms_max": float(np.max(worker)),
                      "ipc_bytes": float(np.mean([r.nbytes for r in records])),
                      "device_decode_ms_per_batch": decode_batch * 16 / n,
                      "sparse_records": sum(r.encoding == tg.SPARSE for r in records)}
    row["compact"]["ipc_to_stored"] = row["compact"]["ipc_bytes"] / stored

    # -- both paths decode to the same values; ADL fidelity of the stored targets
    f = min(args.fidelity_images, n)
    decoded = torch.stack([tg.decode(r, table) for r in records[:f]])
    reference = torch.stack([codec.decode(codes[i].numpy()).float() for i in range(f)])
    row["bit_equal_decode"] = bool(torch.equal(decoded, reference))
    prior = -math.log(99.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    exact = logits[:f]
    students = {"fresh": prior + 0.15 * torch.randn(exact.shape, generator=g),
                "partly_trained": 0.6 * exact + 0.4 * prior + 0.6 * torch.randn(exact.shape, generator=g)}
    row["fidelity"] = {}
    for s_name, s in students.items():
        fid = adl_fidelity(s, exact, decoded)
        row["fidelity"][s_name] = {k: fid[k] for k in ("grad_cosine", "loss_rel_error", "normalizer_rel_error")}
        del fid
    return row


def print_table(rows: list[dict]) -> None:
    def kb(x):
        return f"{x / 1024:,.1f} KB" if x < 1024 ** 2 else f"{x / 1024 ** 2:,.1f} MB"

    print("\n| teacher | above floor | path | stored per image | vs float32 | worker ms/image | IPC per image "
          "| IPC / stored | device decode ms / 16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for path in ("v1", "compact"):
            p = r[path]
            ratio = p["ipc_bytes"] / p["stored_bytes"]
            print(f"| {r['teacher']} | {100 * r['above_floor']:.2f} % | {path} | {kb(p['stored_bytes'])} "
                  f"| {p['ratio_to_float32']:,.0f}x | {p['worker_ms']:.1f} | {kb(p['ipc_bytes'])} | {ratio:.1f} "
                  f"| {p['device_decode_ms_per_batch']:.0f} |")
    print("\n| teacher | decode bit-equal to codec.decode | student | grad cosine | loss rel. error | normaliser rel. error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for s, fid in r["fidelity"].items():
            print(f"| {r['teacher']} | {r['bit_equal_decode']} | {s} | {fid['grad_cosine']:.6f} "
                  f"| {fid['loss_rel_error']:.2e} | {fid['normalizer_rel_error']:.2e} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16, help="images per teacher (one store shard)")
    ap.add_argument("--fidelity-images", type=int, default=2, help="images in the ADL fidelity (float64: memory)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", type=Path, help="a sadpipe checkpoint to add as a real teacher (+ sharpened x2)")
    ap.add_argument("--images-dir", type=Path, help="128 px images to tile for --teacher")
    ap.add_argument("--only", default="", help="comma-separated teacher names to run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker's thread
    teachers = {name: (lambda mu=mu, sd=sd, s=s: synthetic_logits(args.images, mu, sd, seed=100 + s))
                for s, (name, (mu, sd)) in enumerate(SYNTHETIC.items())}
    if args.teacher is not None:
        if args.images_dir is None:
            ap.error("--teacher needs --images-dir")
        pivot = math.log(0.1 / 0.9)
        teachers["toy_teacher"] = lambda: real_teacher_logits(args.teacher, args.images_dir, args.images, args.seed)
        teachers["toy_teacher_sharpened_x2"] = lambda: pivot + 2.0 * (teachers["toy_teacher"]() - pivot)
    only = [t for t in args.only.split(",") if t]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in teachers.items():
            if only and name not in only:
                continue
            print(f"{name}: making {args.images} images of logits ...", file=sys.stderr, flush=True)
            rows.append(measure(name, make(), args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
