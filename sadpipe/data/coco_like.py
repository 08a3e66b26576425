"""A small synthetic dataset laid out exactly like COCO 2017, to run the COCO pipelines at their real geometry.

Layout written by :func:`make_coco_like_dataset` (what ``pipelines/coco_*.toml`` read under ``data.root``)::

    OUT/train2017/000000000001.jpg ...       ids      1..   labeled
    OUT/val2017/000000100001.jpg ...         ids 100001..   labeled
    OUT/unlabeled2017/000000200001.jpg ...   ids 200001..   no annotations
    OUT/annotations/instances_train2017.json
    OUT/annotations/instances_val2017.json
    OUT/annotations/image_info_unlabeled2017.json
    OUT/coco_like_dataset.json               summary, written last (marks a complete dataset)

What is COCO-like: the 80 COCO categories with COCO's ids (1..90 with gaps) and names, JPEG
images named by their zero-padded id, COCO-sized images (640 x 480 landscape, 480 x 640
portrait, 500 x 375; width x height), instances JSONs for the labeled splits and an image-info
JSON (images and categories, no annotations) for the unlabeled one.

What is not: the pictures are the toy generator's (``sadpipe.data.toy``): shapes on cluttered
backgrounds, 1-6 objects per image, the unlabeled split in the toy's shifted style. Category
``k`` (contiguous label) is drawn as toy shape ``k % 6``, so categories sharing a shape look
alike: the set exercises sizes, anchors, category ids and file layout, not accuracy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from .coco import COCO80_CATEGORY_IDS
from .toy import GENERATOR_VERSION, SPLIT_FIRST_ID, check_counts, coco_split, image_rng, render_splits, \
    render_toy_image, write_json

__all__ = ["make_coco_like_dataset", "COCO80_NAMES", "COCO80_SUPERCATEGORIES", "COCO_LIKE_SIZES",
           "coco80_categories", "COCO_LIKE_FILES"]

# Names and supercategories of COCO's 80 categories, in the order of COCO80_CATEGORY_IDS (1, 2, ..., 90).
COCO80_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COCO80_SUPERCATEGORIES = (
    ("person",) + ("vehicle",) * 8 + ("outdoor",) * 5 + ("animal",) * 10 + ("accessory",) * 5 + ("sports",) * 10
    + ("kitchen",) * 7 + ("food",) * 10 + ("furniture",) * 6 + ("electronic",) * 6 + ("appliance",) * 5
    + ("indoor",) * 7
)

# (width, height) of image i of a split: COCO's most common sizes, cycled so even 4 images hold each.
COCO_LIKE_SIZES = ((640, 480), (480, 640), (640, 480), (500, 375))

COCO_LIKE_FILES = {
    "train": {"images": "train2017", "annotations": "annotations/instances_train2017.json"},
    "val": {"images": "val2017", "annotations": "annotations/instances_val2017.json"},
    "unlabeled": {"images": "unlabeled2017", "image_info": "annotations/image_info_unlabeled2017.json"},
}
SUMMARY_FILE = "coco_like_dataset.json"
_IN_PROGRESS_FILE = ".coco_like_in_progress"  # marks a folder this module started to write
_CHUNK = 8        # images per worker task (COCO-sized images take ~10x longer than toy ones)
_JPEG_QUALITY = 90


def coco80_categories() -> list[dict[str, Any]]:
    """COCO's ``categories`` list: ``{"supercategory", "id", "name"}`` for the 80 categories, by id."""
    return [{"supercategory": sup, "id": cid, "name": name}
            for cid, name, sup in zip(COCO80_CATEGORY_IDS, COCO80_NAMES, COCO80_SUPERCATEGORIES, strict=True)]


def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"  # COCO naming


def _render_chunk(out_dir: str, split: str, start: int, stop: int, seed: int, sizes) -> list:
    """Render and save images ``start..stop-1`` of ``split`` (worker process); ``[(image entry, objects)]``."""
    images_dir = Path(out_dir) / COCO_LIKE_FILES[split]["images"]
    results = []
    for index in range(start, stop):
        image_id = SPLIT_FIRST_ID[split] + index
        width, height = sizes[index % len(sizes)]
        pixels, objects = render_toy_image(image_rng(seed, split, index), split, (height, width),
                                           num_classes=len(COCO80_CATEGORY_IDS))
        Image.fromarray(pixels).save(images_dir / _file_name(image_id), format="JPEG", quality=_JPEG_QUALITY)
        entry = {"id": image_id, "file_name": _file_name(image_id), "height": height, "width": width}
        results.append((entry, objects))
    return results


def _prepare_out_dir(out_dir: Path) -> None:
    """Clear a previous COCO-like dataset in ``out_dir``; refuse any other non-empty folder.

    A real COCO root has the same folder names, so only a folder this module wrote (its summary
    or its in-progress marker is there) is ever cleared.
    """
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{str(out_dir)!r} exists and is not a directory")
        entries = sorted(p.name for p in out_dir.iterdir())
        ours = (out_dir / SUMMARY_FILE).is_file() or (out_dir / _IN_PROGRESS_FILE).is_file()
        known = {"train2017", "val2017", "unlabeled2017", "annotations", SUMMARY_FILE, _IN_PROGRESS_FILE}
        foreign = [name for name in entries if name not in known]
        if entries and (foreign or not ours):
            raise FileExistsError(f"{str(out_dir)!r} is not empty and is not a COCO-like dataset made by sadpipe "
                                  f"(it holds {(foreign or entries)[:5]}); choose an empty or new directory")
        for name in entries:
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _IN_PROGRESS_FILE).write_text("sadpipe make-toy-data --preset coco is writing this folder\n")


def make_coco_like_dataset(out_dir, seed: int = 0, *, n_train: int = 16, n_val: int = 8, n_unlabeled: int = 8,
                           workers: int | None = None) -> dict[str, Any]:
    """Write the COCO-like dataset to ``out_dir`` (see module docstring) and return its summary dict.

    Deterministic: the same seed gives byte-identical files, whatever ``workers`` (processes
    rendering images; default up to 2). A previous COCO-like dataset in ``out_dir`` is replaced;
    any other content makes it refuse. About 0.1-0.2 s and 60-90 KB per image.
    """
    counts = {"train": n_train, "val": n_val, "unlabeled": n_unlabeled}
    check_counts(counts)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    for files in COCO_LIKE_FILES.values():
        (out_dir / files["images"]).mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(exist_ok=True)

    rendered = render_splits(_render_chunk, out_dir, counts, seed, COCO_LIKE_SIZES, workers, chunk=_CHUNK)
    info = {"description": f"sadpipe COCO-like synthetic dataset (toy shapes, COCO layout), seed {seed}",
            "version": str(GENERATOR_VERSION)}
    categories = coco80_categories()
    objects = {}
    for split, files in COCO_LIKE_FILES.items():
        images, annotations = coco_split(rendered[split], SPLIT_FIRST_ID[split] * 10, COCO80_CATEGORY_IDS)
        objects[split] = len(annotations)
        if split == "unlabeled":  # an image-info file, like image_info_unlabeled2017.json
            write_json(out_dir / files["image_info"],
                       {"info": info, "licenses": [], "images": images, "categories": categories})
        else:
            write_json(out_dir / files["annotations"],
                       {"info": info, "licenses": [], "images": images, "annotations": annotations,
                        "categories": categories})
    summary = {
        "generator": "sadpipe.data.coco_like",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "counts": counts,
        "objects": objects,
        "image_sizes_wh": [list(s) for s in COCO_LIKE_SIZES],
        "first_image_id": dict(SPLIT_FIRST_ID),
        "num_categories": len(categories),
        "files": COCO_LIKE_FILES,
    }
    write_json(out_dir / SUMMARY_FILE, summary)  # written last: marks a complete dataset
    (out_dir / _IN_PROGRESS_FILE).unlink()
    return {**summary, "out_dir": str(out_dir)}
