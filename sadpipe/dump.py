"""`sadpipe dump-teacher`: run the teacher once and write its outputs to a teacher cache.

Flow: plan (labeled train + unlabeled images, fixed order) -> the store (created by rank 0,
or resumed) -> each rank takes its unfinished shards (k % world == rank) -> DataLoader
workers read and preprocess a whole shard's images (both views) -> the teacher runs under
no_grad (AMP on CUDA), images grouped by padded size so each image's logits are those of the
image padded alone -> the codec quantises on the device -> a background thread writes the
shard while the next one is computed -> rank 0 finalises once every rank is done.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .cache.codec import codec_from_dict, default_codec
from .cache.format import ImageResult, StoreSpec, ViewResult
from .cache.writer import StoreWriter
from .config import save_resolved
from .data.coco import check_disjoint_ids
from .data.dataset import labeled_source, unlabeled_source
from .data.images import ImageReadError, read_image
from .labeling import postprocess
from .models import Detector, file_sha256, load_detector
from .predict import autocast
from .training import DistInfo, barrier, init_distributed, progress_bar, select_device
from .transforms import Preprocess, geometry_from_config, hflip

VIEWS = ("orig", "hflip")


class DumpError(ValueError):
    pass


@dataclass(frozen=True)
class PlanEntry:
    image_id: int
    split: str
    path: str


def build_plan(cfg: dict) -> list[PlanEntry]:
    """Labeled train images then unlabeled ones, each sorted by image id; ids must be unique."""
    labeled = labeled_source(cfg, "train")
    unlabeled = unlabeled_source(cfg)
    sources = [labeled] + ([unlabeled] if unlabeled is not None else [])
    check_disjoint_ids(*sources)
    plan = [PlanEntry(r.image_id, "labeled", str(r.path)) for r in labeled.images]
    if unlabeled is not None:
        plan += [PlanEntry(r.image_id, "unlabeled", str(r.path)) for r in unlabeled.images]
    return plan


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
            return {"index": index, "image_id": entry.image_id, "failure": str(e)}
        size, padded = self.preprocess.sizes(*image.shape[:2])
        images = {v: self.preprocess(hflip(image)[0] if v == "hflip" else image) for v in self.views}
        return {"index": index, "image_id": entry.image_id, "failure": "", "images": images,
                "orig_hw": tuple(image.shape[:2]), "size": size, "padded": padded}


def _shard_batches(writer: StoreWriter, shards: list[int]):
    for k in shards:
        yield list(writer.shard_indices(k))


@torch.no_grad()
def teacher_outputs(teacher: Detector, items: list[dict], view: str, codec, device: torch.device, *,
                    batch_size: int, detect_cfg: dict, with_box_regression: bool, amp: bool) -> dict[int, ViewResult]:
    """Run the teacher on one view of ok items, grouped by padded size; returns index -> ViewResult."""
    out: dict[int, ViewResult] = {}
    groups: dict[tuple[int, int], list[dict]] = {}
    for item in items:
        groups.setdefault(item["padded"], []).append(item)
    for padded, group in groups.items():
        anchors = teacher.layout.anchors(padded).to(device)
        level_sizes = teacher.layout.anchors_per_level(padded)
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            batch = torch.zeros((len(chunk), 3, *padded))
            for i, item in enumerate(chunk):
                img = item["images"][view]
                batch[i, :, : img.shape[1], : img.shape[2]] = img
            batch = batch.to(device, non_blocking=device.type == "cuda")
            with autocast(device, amp):
                cls_logits, bbox = teacher(batch)
            cls_logits, bbox = cls_logits.float(), bbox.float()
            codes = codec.encode(cls_logits).cpu().numpy()  # quantised on the device, uint8 crosses to the host
            boxes16 = bbox.half().cpu().numpy() if with_box_regression else None
            dets = postprocess(cls_logits, bbox, anchors, [it["size"] for it in chunk], level_sizes,
                               score_thresh=detect_cfg["score_thresh"], nms_thresh=detect_cfg["nms_thresh"],
                               detections_per_img=detect_cfg["detections_per_img"],
                               topk_candidates=detect_cfg["topk_candidates"])
            for i, item in enumerate(chunk):
                out[item["index"]] = ViewResult(
                    cls_codes=codes[i], box_regression=None if boxes16 is None else boxes16[i],
                    det_boxes=dets[i]["boxes"].cpu().numpy().astype(np.float32),
                    det_scores=dets[i]["scores"].cpu().numpy().astype(np.float32),
                    det_labels=dets[i]["labels"].cpu().numpy())
    return out


class BackgroundWriter:
    """Writes shards on a thread so teacher compute overlaps encoding and I/O.

    The queue is bounded (2 shards) so a slow disk throttles the teacher instead of memory
    growing; an error on the thread is re-raised in the caller at the next put or at close.
    """

    def __init__(self, writer: StoreWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
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
                    self.writer.write_shard(*job)
                except BaseException as e:  # handed to the main thread
                    self.error = e

    def put(self, shard: int, results: list[ImageResult]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((shard, results))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def make_spec(cfg: dict, plan: list[PlanEntry], teacher: Detector, teacher_path: Path, codec, views, *,
              with_box_regression: bool) -> StoreSpec:
    layout, preprocess = geometry_from_config(cfg)
    d = cfg["dump"]
    return StoreSpec(
        image_ids=[p.image_id for p in plan], splits=[p.split for p in plan], paths=[p.path for p in plan],
        views=tuple(views), num_classes=teacher.num_classes,
        max_anchors=layout.max_anchors(preprocess.min_size, preprocess.max_size), num_levels=layout.num_levels,
        images_per_shard=d["images_per_shard"], max_detections=cfg["detect"]["detections_per_img"],
        with_box_regression=with_box_regression,
        metadata={
            "anchor_layout": layout.to_dict(), "anchor_layout_fingerprint": layout.fingerprint(),
            "preprocessing": preprocess.to_dict(),
            "classes": {"category_ids": teacher.spec["category_ids"], "names": teacher.spec["class_names"]},
            "teacher": {"arch": teacher.spec["arch"], "checkpoint_sha256": file_sha256(teacher_path),
                        "checkpoint": str(teacher_path), "spec": teacher.spec},
            "codec": codec.to_dict(), "detect": dict(cfg["detect"]), "config": cfg,
        })


def dump_teacher(cfg: dict, teacher_path: str | Path, out: str | Path, *, device: str = "auto",
                 views: tuple[str, ...] | None = None, with_box_regression: bool | None = None,
                 overwrite: bool = False, strict: bool = False, log=print) -> dict:
    """Write (or resume) the teacher cache ``out``. Returns a summary dict (images/s, counts)."""
    out, teacher_path = Path(out), Path(teacher_path)
    dev = select_device(device)
    info: DistInfo = init_distributed(dev)
    d = cfg["dump"]
    views = tuple(views or d["views"])
    if unknown := [v for v in views if v not in VIEWS]:
        raise DumpError(f"unknown view(s) {unknown}; choose from {', '.join(VIEWS)}")
    with_box_regression = d["with_box_regression"] if with_box_regression is None else with_box_regression
    layout, preprocess = geometry_from_config(cfg)

    teacher = load_detector(teacher_path).to(dev).eval()
    if teacher.layout.fingerprint() != layout.fingerprint():
        raise DumpError(f"teacher {teacher_path} was built with anchor layout {teacher.layout.to_dict()}, the config "
                        f"says {layout.to_dict()}; the student learns per anchor, so they must match (fix [geometry])")
    codec = codec_from_dict(d["codec"]) if d["codec"] else default_codec()
    plan = build_plan(cfg)
    spec = make_spec(cfg, plan, teacher, teacher_path, codec, views, with_box_regression=with_box_regression)

    if info.is_main:
        writer = StoreWriter.create_or_resume(out, spec, overwrite=overwrite)
        log(writer.resume_summary)
        save_resolved(cfg, out.parent, name=f"{out.name}.config.resolved.toml")
    barrier(info)
    if not info.is_main:
        writer = StoreWriter.open(out)
    shards = writer.pending_shards(info.rank, info.world_size)

    dataset = DumpImages(plan, preprocess, views)
    loader = DataLoader(dataset, batch_sampler=list(_shard_batches(writer, shards)), collate_fn=list,
                        num_workers=d["num_workers"], pin_memory=False)
    todo = sum(len(writer.shard_indices(k)) for k in shards)
    bar = progress_bar(todo, 0, f"dump rank {info.rank}", enabled=True)
    background = BackgroundWriter(writer)
    failed, t0 = 0, time.perf_counter()
    try:
        for shard, items in zip(shards, loader):
            ok_items = [it for it in items if not it["failure"]]
            if strict and len(ok_items) < len(items):
                bad = next(it for it in items if it["failure"])
                raise ImageReadError(f"{bad['failure']} (--strict stops at the first unreadable image)")
            per_view = {v: teacher_outputs(teacher, ok_items, v, codec, dev, batch_size=d["batch_size"],
                                           detect_cfg=cfg["detect"], with_box_regression=with_box_regression,
                                           amp=True) for v in views}
            results = []
            for it in items:
                if it["failure"]:
                    failed += 1
                    results.append(ImageResult.failed(it["index"], it["image_id"], it["failure"]))
                    continue
                grid = np.asarray(layout.grid_sizes(it["padded"]), dtype=np.int32)
                results.append(ImageResult(index=it["index"], image_id=it["image_id"], orig_hw=it["orig_hw"],
                                           resized_hw=it["size"], padded_hw=it["padded"], grid_hw=grid,
                                           num_anchors=layout.num_anchors(it["padded"]),
                                           views={v: per_view[v][it["index"]] for v in views}))
            background.put(shard, results)
            bar.update(len(items))
    finally:
        try:
            background.close()
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    barrier(info)
    summary = {"rank": info.rank, "images": todo, "failed": failed, "seconds": seconds,
               "images_per_s": todo / seconds if seconds > 0 else 0.0}
    if info.is_main:
        summary["completion"] = writer.finalize()
    barrier(info)
    return summary
