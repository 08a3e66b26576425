"""Deterministic synthetic detection dataset: coloured shapes on cluttered backgrounds.

Layout written by :func:`make_toy_dataset` (COCO style, ids unique across splits)::

    OUT/train/images/000000000001.png ...      OUT/train/annotations.json      ids      1..
    OUT/val/images/000000100001.png ...        OUT/val/annotations.json        ids 100001..
    OUT/unlabeled/images/000000200001.png ...  OUT/unlabeled/image_info.json   ids 200001..
    OUT/unlabeled/hidden_annotations.json      (ground truth of the unlabeled split, analysis only)
    OUT/toy_dataset.json                       (summary, written last)

The class is the *shape* (circle, square, triangle, star, cross, ring); colours are random and
independent of the class. Each image holds 1-6 objects, sizes log-uniform in ~12-56 px (at 128 px),
rotated, possibly overlapping: an object may hide part of an earlier one, placements that would
leave less than ``MIN_VISIBLE_FRACTION`` of an earlier object visible are re-drawn, and each box is
the tight box of the object's *visible* pixels. Clutter: colour gradients, Gaussian noise, a few
random strokes and small irregular blobs that are not objects.

Distribution shift of the unlabeled split (what semi-supervised distillation must cope with):
striped/wavy backgrounds in a darker, warm palette instead of linear gradients, stronger noise,
more strokes, and objects ~20 % smaller on average (log-uniform ~10-46 px).

Every image is generated from its own ``numpy.random.Generator`` seeded by
``(seed, split, index)``, so files are byte-identical for a given seed and an image does not
depend on how many images the other splits hold.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import shutil
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["make_toy_dataset", "TOY_CATEGORIES", "GENERATOR_VERSION", "render_toy_image"]

GENERATOR_VERSION = 1
TOY_CATEGORIES = ("circle", "square", "triangle", "star", "cross", "ring")  # COCO ids 1..6
SPLIT_FIRST_ID = {"train": 1, "val": 100_001, "unlabeled": 200_001}
_SPLIT_SEED_CODE = {"train": 0, "val": 1, "unlabeled": 2}
MAX_IMAGES_PER_SPLIT = 99_999  # keeps the id ranges above disjoint

MIN_VISIBLE_FRACTION = 0.6   # an earlier object must keep this much of its area visible
MIN_COLOUR_DISTANCE = 110.0  # RGB distance between an object and what it is drawn on
_PLACEMENT_TRIES = 12
_COLOUR_TRIES = 24
_CHUNK = 100  # images per worker task


@dataclass(frozen=True)
class _Style:
    """Per-split appearance; sizes are in pixels at a 128 px image and scale with image size."""

    background: str          # "gradient" or "waves"
    palette_low: tuple[int, int, int]
    palette_high: tuple[int, int, int]
    noise_sigma: float
    min_size: float
    max_size: float
    strokes: tuple[int, int]  # inclusive range of distractor strokes
    blobs: tuple[int, int]    # inclusive range of distractor blobs


_LABELED_STYLE = _Style("gradient", (40, 40, 40), (215, 215, 215), 6.0, 12.0, 56.0, (1, 3), (0, 3))
_SHIFTED_STYLE = _Style("waves", (50, 30, 15), (170, 130, 100), 9.0, 10.0, 46.0, (2, 5), (1, 4))
_STYLES = {"train": _LABELED_STYLE, "val": _LABELED_STYLE, "unlabeled": _SHIFTED_STYLE}


# ---------------------------------------------------------------------------- drawing

@functools.lru_cache(maxsize=4)
def _gaussian_table(sigma: float) -> np.ndarray:
    """float32 [256]: the (k + 0.5) / 256 quantiles of N(0, sigma^2)."""
    normal = statistics.NormalDist(0.0, sigma)
    table = np.array([normal.inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=8)
def _unit_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) float32 [height, width], each in [0, 1] along its axis; read-only, shared between images."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1), xx / max(width - 1, 1)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _background(rng: np.random.Generator, style: _Style, height: int, width: int) -> np.ndarray:
    """float32 [height, width, 3] in [0, 255]."""
    low, high = np.array(style.palette_low, float), np.array(style.palette_high, float)
    c0, c1 = rng.uniform(low, high).astype(np.float32), rng.uniform(low, high).astype(np.float32)
    yy, xx = _unit_grid(height, width)
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = c0 + t[..., None] * (c1 - c0)
    if style.background == "waves":
        for _ in range(2):
            freq = rng.uniform(2.0, 6.0)
            theta = rng.uniform(0, math.pi)
            phase = rng.uniform(0, 2 * math.pi)
            wave = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
            image += wave[..., None] * rng.uniform(10, 25, size=3).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _draw_distractors(rng: np.random.Generator, style: _Style, canvas: Image.Image, scale: float) -> None:
    """Strokes and small irregular blobs that are not objects (drawn before the objects)."""
    draw = ImageDraw.Draw(canvas)
    extent = (canvas.width, canvas.height)  # x, y; one uniform draw per coordinate, x first
    for _ in range(int(rng.integers(style.strokes[0], style.strokes[1] + 1))):
        points = [tuple(float(v) for v in rng.uniform(0, extent)) for _ in range(int(rng.integers(2, 4)))]
        colour = tuple(int(v) for v in _random_colour(rng))
        draw.line(points, fill=colour, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(style.blobs[0], style.blobs[1] + 1))):
        centre = rng.uniform(0, extent)
        radius = rng.uniform(2.5, 6.0) * scale
        angles = np.sort(rng.uniform(0, 2 * math.pi, 9))
        radii = radius * rng.uniform(0.7, 1.2, 9)
        points = [(float(centre[0] + r * math.cos(a)), float(centre[1] + r * math.sin(a)))
                  for a, r in zip(angles, radii)]
        draw.polygon(points, fill=tuple(int(v) for v in _random_colour(rng)))


def _shape_outline(rng: np.random.Generator, shape: int, extent: float, height: int, width: int):
    """Random placement of shape ``TOY_CATEGORIES[shape]``: ``("ellipse", (x0, y0, x1, y1), ring_width)``
    or ``("polygon", float [P, 2] vertices, 0)`` in image pixels; ``extent`` is the nominal size."""
    r = extent / 2
    centre = rng.uniform((r, r), (width - r, height - r))  # (x, y): shapes lie (almost) fully inside the image
    angle = rng.uniform(0, 2 * math.pi)
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    name = TOY_CATEGORIES[shape]
    if name in ("circle", "ring"):
        rx, ry = r * aspect, r / aspect
        width = 0 if name == "circle" else max(3, int(round(0.22 * extent)))
        return "ellipse", (centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry), width
    if name == "square":
        h = r / math.sqrt(2) * 1.15  # a square's diagonal ~ its nominal extent
        local = np.array([[-h * aspect, -h / aspect], [h * aspect, -h / aspect],
                          [h * aspect, h / aspect], [-h * aspect, h / aspect]])
    elif name == "triangle":
        a = np.array([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
        local = np.stack([np.cos(a), np.sin(a)], 1) * r
    elif name == "star":
        a = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        local = np.stack([np.cos(a), np.sin(a)], 1) * radii[:, None]
    else:  # cross: a plus sign with arm half-width w
        w = 0.19 * extent
        local = np.array([[-w, -r], [w, -r], [w, -w], [r, -w], [r, w], [w, w],
                          [w, r], [-w, r], [-w, w], [-r, w], [-r, -w], [-w, -w]])
    c, s = math.cos(angle), math.sin(angle)
    return "polygon", local @ np.array([[c, s], [-s, c]]) + centre, 0


def _shape_mask(rng: np.random.Generator, shape: int, extent: float, height: int, width: int):
    """Rasterise one random shape: ``(y0, x0, bool [h, w])`` crop of the image, or None if empty."""
    kind, geometry, ring_width = _shape_outline(rng, shape, extent, height, width)
    points = np.asarray(geometry, dtype=np.float64).reshape(-1, 2)
    x0, y0 = (max(0, int(math.floor(v)) - 1) for v in points.min(axis=0))
    x1, y1 = (min(limit, int(math.ceil(v)) + 2) for v, limit in zip(points.max(axis=0), (width, height)))
    if x1 <= x0 or y1 <= y0:
        return None
    crop = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(crop)
    shifted = points - (x0, y0)
    if kind == "ellipse":
        box = [float(v) for v in shifted.reshape(-1)]
        if ring_width:
            draw.ellipse(box, outline=255, width=ring_width)
        else:
            draw.ellipse(box, fill=255)
    else:
        draw.polygon([(float(x), float(y)) for x, y in shifted], fill=255)
    mask = np.asarray(crop) > 127
    return (y0, x0, mask) if mask.any() else None


def render_toy_image(rng: np.random.Generator, split: str, image_size: int | tuple[int, int] = 128,
                     num_classes: int = len(TOY_CATEGORIES)):
    """One image: ``(uint8 [H, W, 3], list of (label, (x1, y1, x2, y2), visible_area))``.

    ``image_size`` is S (a square S x S image) or ``(H, W)``; sizes of objects and clutter scale
    with ``min(H, W) / 128``. ``split`` ("train", "val" or "unlabeled") picks the style.
    Boxes are tight pixel-edge boxes of visible pixels (x2, y2 exclusive). Labels are in
    ``[0, num_classes)`` and label ``k`` is drawn as shape ``TOY_CATEGORIES[k % 6]``: with more
    than six classes, classes sharing a shape look alike (see ``sadpipe.data.coco_like``).
    """
    style = _STYLES[split]
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    scale = min(height, width) / 128.0
    canvas = Image.fromarray(_background(rng, style, height, width).round().astype(np.uint8))
    _draw_distractors(rng, style, canvas, scale)
    pixels = np.asarray(canvas, dtype=np.float32).copy()

    owner = np.full((height, width), -1, np.int32)  # index of the object visible at a pixel
    full_areas: list[int] = []
    visible_areas: list[int] = []
    labels: list[int] = []
    log_lo, log_hi = math.log(style.min_size * scale), math.log(style.max_size * scale)
    for _ in range(int(rng.integers(1, 7))):
        label = int(rng.integers(num_classes))
        extent = math.exp(rng.uniform(log_lo, log_hi))
        for _attempt in range(_PLACEMENT_TRIES):
            placed = _shape_mask(rng, label % len(TOY_CATEGORIES), extent, height, width)
            if placed is None:
                continue
            y0, x0, mask = placed
            region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
            covered = owner[region][mask]
            covered = covered[covered >= 0]
            if covered.size:
                hidden = np.bincount(covered, minlength=len(full_areas))
                if np.any(np.array(visible_areas) - hidden < MIN_VISIBLE_FRACTION * np.array(full_areas)):
                    continue  # would hide too much of an earlier object: try elsewhere
                for index, count in enumerate(hidden):
                    visible_areas[index] -= int(count)
            break
        else:
            continue  # no acceptable placement: leave this object out
        under = pixels[region][mask].mean(axis=0)  # what the object is drawn on
        best, best_distance = None, -1.0
        for _c in range(_COLOUR_TRIES):
            colour = _random_colour(rng)
            distance = float(np.linalg.norm(colour - under))
            if distance > best_distance:
                best, best_distance = colour, distance
            if distance >= MIN_COLOUR_DISTANCE:
                break
        pixels[region][mask] = best
        owner[region][mask] = len(full_areas)
        full_areas.append(int(mask.sum()))
        visible_areas.append(int(mask.sum()))
        labels.append(label)

    # Gaussian noise via a 256-entry quantile table indexed by random bytes: 10x cheaper than
    # rng.normal here and indistinguishable for clutter purposes.
    noise_bytes = np.frombuffer(rng.bytes(pixels.size), dtype=np.uint8).reshape(pixels.shape)
    pixels += _gaussian_table(style.noise_sigma)[noise_bytes]
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    objects = []
    for index, (label, area) in enumerate(zip(labels, full_areas)):
        ys, xs = np.nonzero(owner == index)
        if ys.size == 0 or ys.size < MIN_VISIBLE_FRACTION * area:
            continue  # defensive: placement already guarantees visibility
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append((label, box, int(ys.size)))
    return image, objects


# ---------------------------------------------------------------------------- dataset files

def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _coco_categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(TOY_CATEGORIES)]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: images do not depend on each other."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_SEED_CODE[split], index]))


def _render_chunk(out_dir: str, split: str, start: int, stop: int, seed: int, image_size: int):
    """Render and save images ``start..stop-1`` of a split; returns ``[(COCO image entry, objects)]``.

    Runs in a worker process: a module-level function with plain arguments.
    """
    images_dir = Path(out_dir) / split / "images"
    results = []
    for index in range(start, stop):
        image_id = SPLIT_FIRST_ID[split] + index
        pixels, objects = render_toy_image(image_rng(seed, split, index), split, image_size)
        # compress_level 1: the noise makes higher levels barely smaller but slower
        Image.fromarray(pixels).save(images_dir / _file_name(image_id), format="PNG", compress_level=1)
        entry = {"id": image_id, "file_name": _file_name(image_id), "height": image_size, "width": image_size}
        results.append((entry, objects))
    return results


def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.png"  # COCO naming: UnlabeledSource recovers the id from the stem


def coco_split(results, first_annotation_id: int, category_ids=None):
    """COCO ``images`` and ``annotations`` lists from ``[(COCO image entry, objects)]``.

    ``objects`` are ``render_toy_image``'s; label ``k`` becomes category id ``category_ids[k]``
    (default ``k + 1``). Annotation ids count up from ``first_annotation_id``.
    """
    images, annotations = [], []
    for entry, objects in results:
        image_id = entry["id"]
        images.append(entry)
        for label, (x1, y1, x2, y2), area in objects:
            annotations.append({"id": first_annotation_id + len(annotations), "image_id": image_id,
                                "category_id": label + 1 if category_ids is None else category_ids[label],
                                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                "area": float(area), "iscrowd": 0})
    return images, annotations


def render_splits(render_chunk, out_dir: Path, counts: dict[str, int], seed: int, size_arg, workers: int,
                  chunk: int = _CHUNK) -> dict[str, list]:
    """``{split: [result of render_chunk per image]}`` in image order.

    ``render_chunk(out_dir: str, split, start, stop, seed, size_arg)`` renders and saves images
    ``start..stop-1`` of a split and returns one result per image; chunks run on ``workers``
    processes (it must be a module-level function). The files do not depend on ``workers``.
    """
    tasks = [(str(out_dir), split, start, min(start + chunk, count), seed, size_arg)
             for split, count in counts.items() for start in range(0, count, chunk)]
    if workers <= 1 or len(tasks) <= 1:
        chunks = [render_chunk(*task) for task in tasks]
    else:
        # spawn, not fork: the caller may hold torch/OpenMP threads that fork would copy badly
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunks = list(pool.map(render_chunk, *zip(*tasks)))
    results: dict[str, list] = {split: [] for split in counts}
    for task, rendered in zip(tasks, chunks):
        results[task[1]].extend(rendered)
    return results


def _render_all(out_dir: Path, counts: dict[str, int], seed: int, image_size: int, workers: int):
    """``{split: [(COCO image entry, objects)]}`` in image order, rendering on ``workers`` processes."""
    for split in counts:
        (out_dir / split / "images").mkdir(parents=True, exist_ok=True)
    return render_splits(_render_chunk, out_dir, counts, seed, image_size, workers)


def check_counts(counts: dict[str, int]) -> None:
    for split, count in counts.items():
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_IMAGES_PER_SPLIT:
            raise ValueError(f"n_{split} must be an integer in [0, {MAX_IMAGES_PER_SPLIT}], got {count!r}")


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to write into a folder holding anything but a previous toy dataset; clear that."""
    ours = {"train", "val", "unlabeled", "toy_dataset.json"}
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{str(out_dir)!r} exists and is not a directory")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
        if foreign:
            raise FileExistsError(f"{str(out_dir)!r} is not empty and holds files that are not a toy "
                                  f"dataset ({foreign[:5]}); choose an empty or new directory")
        for name in ("train", "val", "unlabeled"):
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
        (out_dir / "toy_dataset.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def make_toy_dataset(out_dir, seed: int = 0, *, n_train: int = 1200, n_val: int = 300,
                     n_unlabeled: int = 2400, image_size: int = 128,
                     workers: int | None = None) -> dict[str, Any]:
    """Write the toy dataset to ``out_dir`` (see module docstring) and return its summary dict.

    A previous toy dataset in ``out_dir`` is replaced; any other content makes it refuse.
    ``workers`` processes render images (default: up to 2); the files do not depend on it.
    """
    counts = {"train": n_train, "val": n_val, "unlabeled": n_unlabeled}
    check_counts(counts)
    if not isinstance(image_size, int) or image_size < 64:
        raise ValueError(f"image_size must be an integer >= 64, got {image_size!r}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    info = {"description": f"sadpipe toy shapes dataset, seed {seed}", "version": str(GENERATOR_VERSION)}
    rendered = _render_all(out_dir, counts, seed, image_size, workers)
    objects = {}
    for split in counts:
        images, annotations = coco_split(rendered[split], SPLIT_FIRST_ID[split] * 10)
        objects[split] = len(annotations)
        instances = {"info": info, "licenses": [], "images": images, "annotations": annotations,
                     "categories": _coco_categories()}
        if split == "unlabeled":
            write_json(out_dir / split / "image_info.json",
                        {"info": info, "licenses": [], "images": images, "categories": _coco_categories()})
            write_json(out_dir / split / "hidden_annotations.json", instances)
        else:
            write_json(out_dir / split / "annotations.json", instances)
    summary = {
        "generator": "sadpipe.data.toy",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "counts": counts,
        "objects": objects,
        "first_image_id": dict(SPLIT_FIRST_ID),
        "categories": _coco_categories(),
        "files": {
            "train": {"images": "train/images", "annotations": "train/annotations.json"},
            "val": {"images": "val/images", "annotations": "val/annotations.json"},
            "unlabeled": {"images": "unlabeled/images", "image_info": "unlabeled/image_info.json",
                          "hidden_annotations": "unlabeled/hidden_annotations.json"},
        },
        "unlabeled_shift": "wavy darker warm backgrounds, stronger noise, more strokes, objects ~20% smaller",
    }
    write_json(out_dir / "toy_dataset.json", summary)  # written last: marks a complete dataset
    return {**summary, "out_dir": str(out_dir)}
