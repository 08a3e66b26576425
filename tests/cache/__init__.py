"""Synthetic teacher-cache plans and results shared by the cache tests (tiny sizes)."""

from __future__ import annotations

import numpy as np
import torch

from sadpipe.cache.codec import default_codec
from sadpipe.cache.format import ImageResult, StoreSpec, ViewResult

NUM_CLASSES = 3
MAX_ANCHORS = 24
NUM_LEVELS = 2
MAX_DETECTIONS = 5
LAYOUT = {"strides": [8, 16], "sizes": [32.0, 64.0], "aspect_ratios": [0.5, 1.0, 2.0],
          "scales": [1.0, 2 ** (1 / 3)], "pad_divisor": 16}
PREPROCESSING = {"min_size": 64, "max_size": 96, "pad_divisor": 16,
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CLASSES = {"category_ids": [1, 3, 7], "names": ["circle", "square", "triangle"]}


def make_spec(n: int = 10, images_per_shard: int = 4, views=("orig", "hflip"), box_regression=True,
              teacher_sha: str = "ab" * 32, **overrides) -> StoreSpec:
    """A plan of n images with shuffled, non-contiguous ids; first ~60 % labeled."""
    ids = [1000 + 7 * int(j) for j in np.random.default_rng(n).permutation(n)]  # shuffled, gaps of 7
    spec = StoreSpec(
        image_ids=ids,
        splits=["labeled" if i < (6 * n) // 10 else "unlabeled" for i in range(n)],
        paths=[f"/data/img_{x}.jpg" for x in ids],
        views=tuple(views),
        num_classes=NUM_CLASSES,
        max_anchors=MAX_ANCHORS,
        num_levels=NUM_LEVELS,
        images_per_shard=images_per_shard,
        max_detections=MAX_DETECTIONS,
        with_box_regression=box_regression,
        metadata={
            "anchor_layout": LAYOUT,
            "preprocessing": PREPROCESSING,
            "classes": CLASSES,
            "teacher": {"arch": "retinanet_r18", "checkpoint_sha256": teacher_sha},
            "codec": default_codec().to_dict(),
            "config": {"dump": {"batch_size": 2}},
        },
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def make_result(spec: StoreSpec, index: int, failed: set[int] = frozenset()) -> ImageResult:
    """Deterministic result of plan position ``index`` (same inputs -> same arrays)."""
    image_id = spec.image_ids[index]
    if index in failed:
        return ImageResult.failed(index, image_id, f"cannot identify image file for {image_id}")
    rng = np.random.default_rng(index)
    grid = rng.integers(1, 4, size=(NUM_LEVELS, 2)).astype(np.int32)
    num_anchors = int(min(MAX_ANCHORS, 2 * (grid[:, 0] * grid[:, 1]).sum()))
    views = {}
    for v_i, v in enumerate(spec.views):
        # even positions: a weak teacher (most entries above the floor: dense records); odd: a
        # confident one (few entries above it: sparse records)
        loc = -3.0 if index % 2 == 0 else -6.5
        logits = torch.from_numpy(rng.normal(loc, 2.5, size=(num_anchors, NUM_CLASSES)).astype(np.float32))
        d = int(rng.integers(0, MAX_DETECTIONS + 1))
        xy = rng.uniform(0, 50, size=(d, 2)).astype(np.float32)
        views[v] = ViewResult(
            cls_codes=default_codec().encode(logits).numpy(),
            box_regression=(rng.normal(0, 1, size=(num_anchors, 4)).astype(np.float16)
                            if spec.with_box_regression else None),
            det_boxes=np.concatenate([xy, xy + 10 + v_i], axis=1),
            det_scores=rng.uniform(0.05, 1, size=d).astype(np.float32),
            det_labels=rng.integers(0, NUM_CLASSES, size=d),
        )
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    return ImageResult(
        index=index, image_id=image_id, orig_hw=(2 * h, 2 * w), resized_hw=(h, w),
        padded_hw=(-(-h // 16) * 16, -(-w // 16) * 16), grid_hw=grid, num_anchors=num_anchors,
        views=views,
    )


def shard_results(writer, spec: StoreSpec, k: int, failed: set[int] = frozenset()) -> list[ImageResult]:
    return [make_result(spec, i, failed) for i in writer.shard_indices(k)]


def write_all(writer, spec: StoreSpec, failed: set[int] = frozenset(), order=None) -> None:
    for k in (order if order is not None else range(writer.num_shards)):
        writer.write_shard(k, shard_results(writer, spec, k, failed))
