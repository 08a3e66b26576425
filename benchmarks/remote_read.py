"""Requests, bytes and images per second of a student reading a teacher cache: local vs S3 on
loopback (moto's server on 127.0.0.1), with and without read-ahead, with injected latency.

One synthetic store of COCO-like records (``--entries`` sparse entries per image and view, about
3 bytes each before zstd: ~40,000 is the confident teacher of docs/results.md at 122,760 anchors
x 80 classes) and up to 100 detections per image is written once locally and once to S3. Then
one reader process reads every image's compact targets and detections (what a SAD student with
pseudo-labels reads per image), in three ways:

- ``zarr``: plain ``arr[i:i+1]`` reads through zarr 3.1 (the reader before this change): zarr
  reads the shard index again for every inner chunk, so 2 requests per array and image;
- ``range``: TeacherCache in random order: each shard index once per process, then one range
  request per array and image;
- ``readahead``: TeacherCache with a shard order (sadpipe/shard_sampler.py, window W): whole
  shards, the next ones fetched in the background.

Latency is injected per request by sadpipe.cache.storage.InstrumentedStore (an asyncio sleep
before each request, so concurrent requests overlap their waits, as on a network). Example:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/remote_read.py --images 256 --latency-ms 0 20
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sadpipe.cache import targets as tg
from sadpipe.cache.codec import default_codec
from sadpipe.cache.format import ImageResult, StoreSpec, ViewResult
from sadpipe.cache.reader import TeacherCache
from sadpipe.cache.storage import request_stats, store_location
from sadpipe.cache.writer import StoreWriter
from sadpipe.shard_sampler import ShardAwareSampler

ANCHORS, CLASSES, LEVELS, DETECTIONS = 122_760, 80, 5, 100


def start_s3() -> object:
    """moto's S3 server on a free loopback port; the S3 settings of this process point at it."""
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    import boto3
    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def synthetic_spec(n: int, s: int) -> StoreSpec:
    return StoreSpec(
        image_ids=list(range(1, n + 1)), splits=["labeled"] * n, paths=[f"img/{i}.jpg" for i in range(1, n + 1)],
        views=("orig",), num_classes=CLASSES, max_anchors=ANCHORS, num_levels=LEVELS, images_per_shard=s,
        max_detections=DETECTIONS, with_box_regression=False,
        metadata={"anchor_layout": {"synthetic": True}, "preprocessing": {}, "classes": {"category_ids": list(range(CLASSES))},
                  "teacher": {"arch": "synthetic"}, "codec": default_codec().to_dict()})


def synthetic_result(i: int, image_id: int, entries: int) -> ImageResult:
    rng = np.random.default_rng(i)
    m = int(rng.integers(entries // 2, entries * 3 // 2))
    positions = np.sort(rng.choice(ANCHORS * CLASSES, size=m, replace=False))
    deltas = np.diff(positions, prepend=-1).astype(np.uint16)  # gaps < 65536 at these densities
    codes = rng.integers(1, 256, size=m).astype(np.uint8)
    d = int(rng.integers(20, DETECTIONS + 1))
    xy = rng.uniform(0, 600, size=(d, 2)).astype(np.float32)
    view = ViewResult(cls_codes=(tg.SPARSE, deltas, codes), det_boxes=np.concatenate([xy, xy + 50], 1),
                      det_scores=rng.uniform(0.05, 1, d).astype(np.float32), det_labels=rng.integers(0, CLASSES, d))
    return ImageResult(index=i, image_id=image_id, orig_hw=(480, 640), resized_hw=(600, 800), padded_hw=(640, 1024),
                       grid_hw=np.array([[80, 128], [40, 64], [20, 32], [10, 16], [5, 8]], np.int32),
                       num_anchors=ANCHORS, views={"orig": view})


def write_store(location, spec: StoreSpec, entries: int) -> None:
    writer = StoreWriter.create_or_resume(location, spec, overwrite=True)
    for k in range(writer.num_shards):
        writer.write_shard(k, [synthetic_result(i, spec.image_ids[i], entries) for i in writer.shard_indices(k)])
    writer.finalize()


def read_pass(location, mode: str, window: int, latency_s: float, seed: int = 0) -> dict:
    """Read every image's targets + detections once; requests/bytes exclude opening the store."""
    name = f"{location.url}/{mode}/{latency_s}"
    loc = location.instrumented(name, latency_s)
    stats = request_stats(name)
    cache = TeacherCache(loc)
    ids = cache.ok_image_ids()
    s = cache.metadata["images_per_shard"]
    if mode == "readahead":
        sampler = ShardAwareSampler([cache.index_of(i) // s for i in ids], window=window, seed=seed, cache=cache)
        sampler.set_epoch(0)
        order = list(sampler)
    else:
        order = np.random.default_rng(seed).permutation(len(ids)).tolist()
    if mode == "zarr":
        import zarr
        root = zarr.open_group(loc.open_store(read_only=True), mode="r")
        arrays = root["views/orig/targets"], root["views/orig/detections"]
    stats.reset()
    t0 = time.perf_counter()
    for j in order:
        image_id = ids[j]
        if mode == "zarr":
            i = cache.index_of(image_id)
            arrays[0][i:i + 1]
            arrays[1][i:i + 1]
        else:
            cache.get_compact(image_id)
            cache.get_detections(image_id)
    seconds = time.perf_counter() - t0
    snap = stats.snapshot()
    n = len(order)
    return {"requests_per_image": snap["gets"] / n, "kb_per_image": snap["get_bytes"] / n / 1024,
            "images_per_s": n / seconds, "ms_per_image": 1000 * seconds / n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--images-per-shard", type=int, default=64, help="the dump's default (dump.images_per_shard)")
    p.add_argument("--entries", type=int, default=40_000, help="mean sparse entries per record")
    p.add_argument("--window", type=int, default=2, help="shards mixed at a time in readahead mode")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)

    server = start_s3()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="remote_read_"))
    spec = synthetic_spec(args.images, args.images_per_shard)
    places = {"local": store_location(work / "cache.zarr"), "s3": store_location("s3://bench/prefix/cache.zarr")}
    for where, loc in places.items():
        t0 = time.perf_counter()
        write_store(loc, spec, args.entries)
        print(f"wrote {where} store {loc}: {args.images} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    from sadpipe.cache.store_report import store_info
    info = store_info(places["local"])
    print(f"store: {args.images} images, {args.images_per_shard} per shard, targets "
          f"{info['views']['orig']['targets_bytes'] / args.images / 1024:.1f} KB/image, detections "
          f"{info['bytes_per_array']['views/orig/detections'] / args.images / 1024:.2f} KB/image (stored)")
    print()
    print("| store | injected latency | reader | requests / image | KB read / image | ms / image | images / s |")
    print("|---|---|---|---|---|---|---|")
    for latency in args.latency_ms:
        for where, loc in places.items():
            for mode in ("zarr", "range", "readahead"):
                r = read_pass(loc, mode, args.window, latency / 1000)
                label = {"zarr": "zarr arr[i:i+1] (before)", "range": "TeacherCache, random order",
                         "readahead": f"TeacherCache, shard order W={args.window} + read-ahead"}[mode]
                print(f"| {where} | {latency:g} ms | {label} | {r['requests_per_image']:.2f} | "
                      f"{r['kb_per_image']:.1f} | {r['ms_per_image']:.2f} | {r['images_per_s']:.0f} |", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
