"""`sadpipe dump-teacher`: run the teacher once and write its outputs to a teacher cache.

Flow: plan (labeled train + unlabeled images, fixed order) -> the codec fitted on a sample
of the teacher's logits (unless the store being resumed already holds it) -> the store
(created by rank 0, or resumed) -> each rank takes its unfinished shards (k % world == rank),
encoding with the codec read back from the store so every rank uses the same -> DataLoader
workers read and preprocess a whole shard's images (both views) -> the teacher runs under
no_grad (AMP on CUDA), images grouped by padded size so each image's logits are those of the
image padded alone -> on CPU a background thread encodes, postprocesses and writes while the
next batch is computed (on CUDA the device encodes and postprocesses at once and only the
write goes to the thread) -> rank 0 finalises once every rank is done.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import tomli_w
import torch
from torch.utils.data import DataLoader, Dataset

from ..cache import targets
from ..cache.codec import codec_from_dict, default_codec
from ..cache.format import ImageResult, StoreSpec, ViewResult, read_metadata
from ..cache.storage import StoreLocation, store_location
from ..cache.writer import StoreWriter
from ..config import save_resolved
from ..data.coco import check_disjoint_ids
from ..data.dataset import labeled_source, unlabeled_source
from ..data.images import ImageReadError, read_image
from ..engine.device import AnchorCache, autocast, model_to, select_device
from ..engine.distributed import DistInfo, fail_together, init_distributed
from ..engine.progress import progress_bar
from ..errors import UserError
from ..inference import logits_alone
from ..labeling import postprocess
from ..models import Detector, file_sha256, load_detector
from ..settings import VIEWS, DetectConfig, PipelineConfig
from ..transforms import Preprocess, hflip

# Codec fit sample: images spread evenly over the plan, and at most this many (anchor, class)
# values per image (a random subset of anchors) so a COCO-size fit stays in memory.
CODEC_FIT_IMAGES = 32
CODEC_FIT_VALUES_PER_IMAGE = 1 << 18
# Config keys that change how fast the dump runs, not what it writes: left out of the store
# metadata so a resume may change them. Sections a teacher cache does not depend on are too.
RUN_ONLY_DUMP_KEYS = ("num_workers", "batch_size")
STORED_CONFIG_SECTIONS = ("name", "data", "geometry", "detect", "dump", "teacher")


class DumpError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class PlanEntry:
    """path: the file to read; key: the path the store records (relative to data.root), which a
    student compares with its own image's to refuse a cache made from other files."""

    image_id: int
    split: str
    path: str
    key: str


def build_plan(cfg: PipelineConfig, limit: int | None = None) -> list[PlanEntry]:
    """Labeled train images then unlabeled ones, in source order; ids are unique.

    An unlabeled record with the id and file of a labeled one (e.g. train2017 listed inside a
    mixed unlabeled stream) is the same image and is dumped once, as labeled. ``limit`` keeps
    the first ``limit`` plan entries (benchmarks, smoke runs); the plan hash in the store
    records it, so a resume cannot mix plans.
    """
    labeled = labeled_source(cfg.data, "train")
    unlabeled = unlabeled_source(cfg.data)
    sources = [labeled] + ([unlabeled] if unlabeled is not None else [])
    try:
        check_disjoint_ids(*sources)
    except ValueError as e:
        raise DumpError(str(e)) from None
    def entry(r, split: str) -> PlanEntry:
        return PlanEntry(r.image_id, split, str(r.path), cfg.data.key_of(r.path))

    plan = [entry(r, "labeled") for r in labeled.images]
    if unlabeled is not None:
        seen = {p.image_id for p in plan}
        plan += [entry(r, "unlabeled") for r in unlabeled.images if r.image_id not in seen]
    if limit is not None:
        if limit < 1:
            raise DumpError(f"the image limit must be >= 1, got {limit}")
        plan = plan[:limit]
    return plan


def stored_config(cfg: dict) -> dict:
    """The part of the resolved config that decides what the dump writes (kept in the store
    metadata and compared on resume): no student/distill settings, no worker/batch counts."""
    out = {k: cfg[k] for k in STORED_CONFIG_SECTIONS if k in cfg}
    out["dump"] = {k: v for k, v in cfg["dump"].items() if k not in RUN_ONLY_DUMP_KEYS}
    return out


class DumpImages(Dataset):
    """Plan position -> dict with each view's preprocessed image, or the failure reason."""

    def __init__(self, plan: list[PlanEntry], preprocess: Preprocess, views: tuple[str, ...]):
        self.plan, self.preprocess, self.views = plan, preprocess, views

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        entry = self.plan[index]
        try:
            image = read_image(entry.path)
        except ImageReadError as e:
            return {"index": index, "image_id": entry.image_id, "failure": str(e), "path": entry.path}
        size, padded = self.preprocess.sizes(*image.shape[:2])
        images = {v: self.preprocess(hflip(image)[0] if v == "hflip" else image) for v in self.views}
        return {"index": index, "image_id": entry.image_id, "failure": "", "images": images,
                "orig_hw": tuple(image.shape[:2]), "size": size, "padded": padded}


def _shard_batches(writer: StoreWriter, shards: list[int]):
    for k in shards:
        yield list(writer.shard_indices(k))


@torch.no_grad()
def forward_batches(teacher: Detector, items: list[dict], view: str, device: torch.device, *, batch_size: int,
                    amp: bool):
    """Yield (chunk of items, padded (h, w), cls_logits float32 [B, A, K], bbox float32 [B, A, 4]) for one
    view of ok items, grouped by padded size so every image's outputs are those of the image padded alone."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for item in items:
        groups.setdefault(item["padded"], []).append(item)
    for padded, group in groups.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            batch = torch.zeros((len(chunk), 3, *padded))
            for i, item in enumerate(chunk):
                img = item["images"][view]
                batch[i, :, : img.shape[1], : img.shape[2]] = img
            batch = batch.to(device, non_blocking=device.type == "cuda")
            with autocast(device, amp):
                cls_logits, bbox = teacher(batch)
            yield chunk, padded, cls_logits.float(), bbox.float()


@torch.no_grad()
def finish_batch(chunk: list[dict], padded: tuple[int, int], cls_logits: torch.Tensor, bbox: torch.Tensor, *,
                 codec, anchors: Callable[[tuple[int, int]], torch.Tensor], layout, detect: DetectConfig,
                 with_box_regression: bool) -> dict[int, ViewResult]:
    """Encode and postprocess one batch; returns plan position -> ViewResult. Codes and their
    compact form are made on the logits' device: only the entries above the background bin
    (cache/targets.py) cross to the host."""
    codes = codec.encode(cls_logits)  # uint8 [B, A, K]; every image of the chunk has the same padded size
    boxes16 = bbox.half().cpu().numpy() if with_box_regression else None
    dets = postprocess(cls_logits, bbox, anchors(padded), [it["size"] for it in chunk], layout.anchors_per_level(padded),
                       score_thresh=detect.score_thresh, nms_thresh=detect.nms_thresh,
                       detections_per_img=detect.detections_per_img, topk_candidates=detect.topk_candidates)
    return {item["index"]: ViewResult(
        cls_codes=targets.compact_from_codes(codes[i], codec.zstd_level), box_regression=None if boxes16 is None else boxes16[i],
        det_boxes=dets[i]["boxes"].cpu().numpy().astype(np.float32),
        det_scores=dets[i]["scores"].cpu().numpy().astype(np.float32),
        det_labels=dets[i]["labels"].cpu().numpy()) for i, item in enumerate(chunk)}


def shard_results(items: list[dict], per_view: dict[str, dict[int, ViewResult]], layout) -> list[ImageResult]:
    """One ImageResult per item of a shard (failed items carry their reason)."""
    results = []
    for it in items:
        if it["failure"]:
            results.append(ImageResult.failed(it["index"], it["image_id"], it["failure"]))
            continue
        results.append(ImageResult(index=it["index"], image_id=it["image_id"], orig_hw=it["orig_hw"],
                                   resized_hw=it["size"], padded_hw=it["padded"],
                                   grid_hw=np.asarray(layout.grid_sizes(it["padded"]), dtype=np.int32),
                                   num_anchors=layout.num_anchors(it["padded"]),
                                   views={v: per_view[v][it["index"]] for v in per_view}))
    return results


class Background:
    """Runs jobs (callables) in order on one thread, so the teacher's forward overlaps the
    encoding, postprocessing and zarr writes (on a CPU dump, postprocessing alone cost ~11 % of
    the forward time; the thread runs it on the second core while conv2d holds the first).

    The queue is bounded so a slow disk throttles the teacher instead of memory growing; an
    error on the thread is re-raised in the caller at the next put or at close, and later jobs
    are skipped (the failed shard stays pending, the store resumable).
    """

    def __init__(self, maxsize: int = 3):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # handed to the main thread
                    self.error = e

    def put(self, job: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def write_shard(writer: StoreWriter, shard: int, results: list[ImageResult], on_written=None) -> None:
    writer.write_shard(shard, results)
    if on_written is not None:
        on_written(shard)


def make_spec(cfg: PipelineConfig, plan: list[PlanEntry], teacher: Detector, teacher_path: Path, codec, views, *,
              with_box_regression: bool, limit: int | None = None) -> StoreSpec:
    layout, preprocess = cfg.geometry.layout, cfg.geometry.preprocess
    d = cfg.dump
    return StoreSpec(
        image_ids=[p.image_id for p in plan], splits=[p.split for p in plan], paths=[p.key for p in plan],
        views=tuple(views), num_classes=teacher.num_classes,
        max_anchors=layout.max_anchors(preprocess.min_size, preprocess.max_size), num_levels=layout.num_levels,
        images_per_shard=d.images_per_shard, max_detections=cfg.detect.detections_per_img,
        with_box_regression=with_box_regression,
        metadata={
            "anchor_layout": layout.to_dict(), "anchor_layout_fingerprint": layout.fingerprint(),
            "preprocessing": preprocess.to_dict(),
            "classes": {"category_ids": teacher.spec["category_ids"], "names": teacher.spec["class_names"]},
            "teacher": {"arch": teacher.spec["arch"], "checkpoint_sha256": file_sha256(teacher_path),
                        "checkpoint": str(teacher_path.resolve()), "spec": teacher.spec},
            "codec": codec.to_dict(), "detect": dict(cfg.resolved["detect"]), "plan_limit": limit,
            "config": stored_config(cfg.resolved),
        })


def check_teacher(teacher: Detector, teacher_path: Path, cfg: PipelineConfig, categories) -> None:
    """DumpError unless the teacher's anchors, preprocessing and classes are the config's."""
    layout, preprocess = cfg.geometry.layout, cfg.geometry.preprocess
    problems = []
    if teacher.layout.fingerprint() != layout.fingerprint():
        problems.append(f"anchor layout {teacher.layout.to_dict()} vs the config's {layout.to_dict()} "
                        "(the student learns per anchor, so they must match; fix [geometry])")
    if teacher.preprocess != preprocess:
        problems.append(f"preprocessing {teacher.preprocess.to_dict()} vs the config's {preprocess.to_dict()} "
                        "(fix [geometry] min_size/max_size/image_mean/image_std)")
    ids = [int(c) for c in teacher.spec["category_ids"]]
    if ids != [int(c) for c in categories.category_ids]:
        problems.append(f"{len(ids)} classes with category ids {ids[:20]} vs the training annotations' "
                        f"{list(categories.category_ids)[:20]} (the teacher was trained on other classes)")
    if problems:
        raise DumpError(f"teacher {teacher_path} does not fit this config:\n  - " + "\n  - ".join(problems))


def stored_codec(out: StoreLocation, overwrite: bool):
    """The codec of an existing store at ``out`` (resume reuses its fit), else None."""
    meta = None if overwrite else read_metadata(out)
    return None if meta is None or "codec" not in meta else codec_from_dict(meta["codec"])


def unfitted(codec) -> dict:
    d = codec.to_dict()
    return {k: v for k, v in d.items() if k not in ("decode_q", "floor_context")}


def fit_codec(codec, teacher: Detector, plan: list[PlanEntry], preprocess, device: torch.device, *,
              images: int = CODEC_FIT_IMAGES, values_per_image: int = CODEC_FIT_VALUES_PER_IMAGE, log=print):
    """``codec.fit`` on the teacher's orig-view logits of up to ``images`` plan images spread
    evenly over the plan (unreadable ones skipped), each image padded alone; at most
    ``values_per_image`` values per image (a fixed random subset of its anchors)."""
    if not hasattr(codec, "fit"):
        return codec
    positions = np.unique(np.linspace(0, len(plan) - 1, num=min(images, len(plan))).round().astype(int))
    generator = torch.Generator().manual_seed(0)
    sample = []
    with torch.no_grad():
        for i in positions.tolist():
            try:
                image = read_image(plan[i].path)
            except ImageReadError:
                continue
            sample.append(logits_alone(teacher, preprocess, image, device))  # [A_i, K]
    if not sample:
        raise DumpError("none of the codec-fit sample images could be read; check the image paths")
    # codec.fit takes [B, A, K]: the same number of anchors per image, a random subset of each
    # image's anchors (all levels alike; a stride could alias with the 9 anchors of a cell)
    rows = min(min(t.shape[0] for t in sample), max(1, values_per_image // sample[0].shape[1]))
    sample = [t if t.shape[0] == rows else t[torch.randperm(t.shape[0], generator=generator)[:rows].sort().values]
              for t in sample]
    fitted = codec.fit(torch.stack(sample))
    log(f"fitted codec {codec.to_dict().get('name')} on {len(sample)} images of the plan")
    return fitted


def dump_teacher(cfg: PipelineConfig, teacher_path: str | Path, out: str | Path, *, device: str = "auto",
                 views: tuple[str, ...] | None = None, with_box_regression: bool | None = None,
                 overwrite: bool = False, strict: bool = False, limit: int | None = None, log=print,
                 on_shard_written: Callable[[int], None] | None = None) -> dict:
    """Write (or resume) the teacher cache ``out``.

    ``on_shard_written(k)`` is called (on the writer thread) after store shard k is written; an
    exception there stops the dump as a failed write would (the shards written stay written).

    ``limit`` dumps only the first ``limit`` images of the plan (recorded in the store).
    Returns a summary dict: rank, images (done by this rank in this run), failed, seconds and
    images_per_s of the dump loop, fit_seconds (codec fit), and on rank 0 ``completion``.
    """
    out, teacher_path = store_location(out), Path(teacher_path)  # out: a local path or a URL (s3://...)
    dev = select_device(device)
    info: DistInfo = init_distributed(dev)
    d = cfg.dump
    views = tuple(views or d.views)
    if unknown := [v for v in views if v not in VIEWS]:
        raise DumpError(f"unknown view(s) {unknown}; choose from {', '.join(VIEWS)}")
    with_box_regression = d.with_box_regression if with_box_regression is None else with_box_regression
    layout, preprocess = cfg.geometry.layout, cfg.geometry.preprocess

    teacher = model_to(load_detector(teacher_path), dev).eval()
    check_teacher(teacher, teacher_path, cfg, labeled_source(cfg.data, "train").categories)
    plan = build_plan(cfg, limit)

    fit_seconds = 0.0
    with fail_together(info):  # a refusal on rank 0 (e.g. StoreMismatchError) stops every rank with it
        if info.is_main:
            codec = codec_from_dict(d.codec) if d.codec else default_codec()
            # default_codec() ships decode values fitted on another (the toy) teacher: refit them on
            # this one; a configured codec with its own decode_q is used as given.
            refit = not d.codec or d.codec.get("decode_q") is None
            stored = stored_codec(out, overwrite)
            if stored is not None and unfitted(stored) == unfitted(codec):
                codec = stored  # resume: the fit is part of the store's identity; refitting could differ in the last bit
            elif refit:
                t_fit = time.perf_counter()
                codec = fit_codec(codec, teacher, plan, preprocess, dev, log=log)
                fit_seconds = time.perf_counter() - t_fit
            spec = make_spec(cfg, plan, teacher, teacher_path, codec, views, with_box_regression=with_box_regression,
                             limit=limit)
            writer = StoreWriter.create_or_resume(out, spec, overwrite=overwrite)
            log(writer.resume_summary)
            if out.is_local:
                save_resolved(cfg.resolved, out.path.parent, name=f"{out.path.name}.config.resolved.toml")
            else:  # an object-store prefix has no directory beside it: the resolved config goes inside the store
                out.write_bytes("config.resolved.toml", tomli_w.dumps(cfg.resolved).encode())
    if not info.is_main:
        writer = StoreWriter.open(out)
    codec = codec_from_dict(writer.metadata["codec"])  # every rank encodes with the stored codec
    shards = writer.pending_shards(info.rank, info.world_size)

    dataset = DumpImages(plan, preprocess, views)
    loader = DataLoader(dataset, batch_sampler=list(_shard_batches(writer, shards)), collate_fn=list,
                        num_workers=d.num_workers, pin_memory=False)
    todo = sum(len(writer.shard_indices(k)) for k in shards)
    bar = progress_bar(todo, 0, f"dump rank {info.rank}", enabled=True)
    background = Background()
    # CPU: encode/postprocess on the background thread; CUDA: right away (the logits are big on
    # the device and the GPU does it fast), only the zarr write goes to the thread.
    overlap = dev.type == "cpu"
    anchor_cache = AnchorCache(layout, dev)
    finish = partial(finish_batch, codec=codec, anchors=anchor_cache, layout=layout, detect=cfg.detect,
                     with_box_regression=with_box_regression)
    failed, t0 = 0, time.perf_counter()
    # a failure on any rank (e.g. an image --strict refuses) stops every rank with its message
    with fail_together(info):
        try:
            for shard, items in zip(shards, loader):
                ok_items = [it for it in items if not it["failure"]]
                if strict and len(ok_items) < len(items):
                    bad = next(it for it in items if it["failure"])
                    raise ImageReadError(bad["path"], f"{bad['failure']} (image id {bad['image_id']})",
                                         "Fix or remove the file, or run without --strict to record it as failed.")
                failed += len(items) - len(ok_items)
                per_view: dict[str, dict[int, ViewResult]] = {v: {} for v in views}
                for v in views:
                    for chunk, padded, cls_logits, bbox in forward_batches(teacher, ok_items, v, dev,
                                                                           batch_size=d.batch_size, amp=True):
                        if overlap:
                            background.put(lambda out=per_view[v], a=(chunk, padded, cls_logits, bbox): out.update(finish(*a)))
                        else:
                            per_view[v].update(finish(chunk, padded, cls_logits, bbox))
                # shard_results runs on the thread too: on CPU per_view is filled by the jobs queued before it
                background.put(lambda shard=shard, items=items, per_view=per_view: write_shard(
                    writer, shard, shard_results(items, per_view, layout), on_shard_written))
                bar.update(len(items))
        finally:
            try:
                background.close()
            finally:
                bar.close()
    seconds = time.perf_counter() - t0
    summary = {"rank": info.rank, "images": todo, "failed": failed, "seconds": seconds, "fit_seconds": fit_seconds,
               "images_per_s": todo / seconds if seconds > 0 else 0.0}
    with fail_together(info):
        if info.is_main:
            summary["completion"] = writer.finalize()
    return summary
