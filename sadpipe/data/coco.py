"""COCO instances / image-info parsing, category mapping, unlabeled image folders.

Conventions (see docs/architecture.md): boxes are ``float32 [N, 4]`` ``(x1, y1, x2, y2)`` in
pixels of the original (EXIF-oriented) image; labels are contiguous ``int64`` in
``[0, num_classes)`` following the *sorted* COCO category ids; image ids are ``int`` and every
join (images, annotations, teacher cache) is by image id.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sadpipe.data.images import image_size
from ..errors import MissingInputError, UserError

__all__ = [
    "CocoFormatError", "ImageRecord", "CategoryMap", "torchvision_coco91_to_80_channels", "COCO80_CATEGORY_IDS",
    "ImageSource", "CocoDetectionSource", "UnlabeledSource", "check_disjoint_ids", "stable_image_id",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# Boxes narrower or shorter than this (pixels, after clipping) carry no trainable signal.
MIN_BOX_SIDE = 1.0


class CocoFormatError(UserError, ValueError):
    """A COCO JSON file is malformed; the message names the file and what to fix."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        super().__init__(f"{str(self.path)!r}: {problem}")


@dataclass(frozen=True)
class ImageRecord:
    """One image: COCO id, file name relative to the images dir, resolved path, displayed size."""

    image_id: int
    file_name: str
    path: Path
    height: int
    width: int


@dataclass(frozen=True)
class CategoryMap:
    """Contiguous label <-> COCO category id. Label ``i`` is ``category_ids[i]``; ids strictly increase."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    _label_of: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        ids = tuple(int(c) for c in self.category_ids)
        names = tuple(str(n) for n in self.names)
        if len(ids) != len(names):
            raise ValueError(f"CategoryMap: {len(ids)} category ids but {len(names)} names")
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError(f"CategoryMap: category ids must be unique and sorted, got {ids}; "
                             "build it with CategoryMap.from_coco_categories to sort them")
        object.__setattr__(self, "category_ids", ids)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_label_of", {c: i for i, c in enumerate(ids)})

    @classmethod
    def from_coco_categories(cls, categories: Iterable[Mapping[str, Any]]) -> CategoryMap:
        """From a COCO ``"categories"`` list (``{"id", "name"}`` dicts, any order)."""
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    def to_coco_categories(self) -> list[dict[str, Any]]:
        return [{"id": c, "name": n} for c, n in zip(self.category_ids, self.names)]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def to_label(self, category_id: int) -> int:
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in this CategoryMap "
                           f"(known ids: {list(self.category_ids)})") from None

    def to_category_id(self, label: int) -> int:
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise KeyError(f"label {label} is outside [0, {self.num_classes})")
        return self.category_ids[label]

    def to_dict(self) -> dict[str, list]:
        """JSON-friendly; inverse of :meth:`from_dict`."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoryMap:
        return cls(tuple(data["category_ids"]), tuple(data["names"]))


# torchvision's COCO detection models have 91 output channels indexed by COCO category id:
# channel 0 is background and these ten ids were never used by COCO ("N/A" slots).
_TORCHVISION_COCO_UNUSED_CHANNELS = frozenset({0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
_TORCHVISION_COCO_NUM_CHANNELS = 91
# The 80 category ids COCO annotates, in order (the 91 channels minus background and the N/A slots).
COCO80_CATEGORY_IDS = tuple(c for c in range(_TORCHVISION_COCO_NUM_CHANNELS) if c not in _TORCHVISION_COCO_UNUSED_CHANNELS)


def torchvision_coco91_to_80_channels(category_ids: Sequence[int] | CategoryMap) -> list[int]:
    """Channel of a torchvision COCO-trained head to read for each contiguous label.

    torchvision's COCO models emit 91 class channels where channel ``i`` *is* COCO category id
    ``i`` (0 = background, ten "N/A" slots unused), so the channel for label ``k`` is simply
    ``category_ids[k]``. Use it as ``logits[..., channels]`` to get ``[..., num_classes]``.
    Raises ``ValueError`` for ids that have no real channel.
    """
    ids = list(category_ids.category_ids if isinstance(category_ids, CategoryMap) else category_ids)
    bad = [c for c in ids if not (0 <= int(c) < _TORCHVISION_COCO_NUM_CHANNELS)
           or int(c) in _TORCHVISION_COCO_UNUSED_CHANNELS]
    if bad:
        raise ValueError(f"category ids {bad} have no channel in torchvision's 91-channel COCO heads "
                         "(valid: 1..90 except 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)")
    return [int(c) for c in ids]


# ---------------------------------------------------------------------------- JSON helpers

def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise MissingInputError(f"annotation file {str(path)!r} does not exist; check the path")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(path, f"invalid JSON at line {err.lineno}, column {err.colno}: "
                                    f"{err.msg}") from None
    except UnicodeDecodeError as err:
        raise CocoFormatError(path, f"not UTF-8 text ({err}); is this really a JSON file?") from None


def _require_list(path: Path, data: Any, key: str) -> list:
    if not isinstance(data, dict):
        raise CocoFormatError(path, f"top level must be a JSON object, got {type(data).__name__}")
    if key not in data:
        raise CocoFormatError(path, f"missing key {key!r} (found keys: {sorted(data)}); "
                                    "is this a COCO instances / image-info file?")
    if not isinstance(data[key], list):
        raise CocoFormatError(path, f"{key!r} must be a list, got {type(data[key]).__name__}")
    return data[key]


def _int_field(path: Path, entry: Any, key: str, where: str, *, positive: bool = False) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())):
        raise CocoFormatError(path, f"{where}: field {key!r} must be an integer, got {value!r}")
    if positive and value <= 0:
        raise CocoFormatError(path, f"{where}: field {key!r} must be positive, got {value!r}")
    return int(value)


def _parse_images(path: Path, entries: list, images_dir: Path) -> list[ImageRecord]:
    records: dict[int, ImageRecord] = {}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        image_id = _int_field(path, entry, "id", where)
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise CocoFormatError(path, f"{where} (id {image_id}): 'file_name' must be a non-empty string")
        height = _int_field(path, entry, "height", where, positive=True)
        width = _int_field(path, entry, "width", where, positive=True)
        if image_id in records:
            raise CocoFormatError(path, f"duplicate image id {image_id} ({records[image_id].file_name!r} "
                                        f"and {file_name!r}); image ids must be unique")
        records[image_id] = ImageRecord(image_id, file_name, images_dir / file_name, height, width)
    return sorted(records.values(), key=lambda r: r.image_id)


def _parse_categories(path: Path, entries: list) -> CategoryMap:
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        cat_id = _int_field(path, entry, "id", f"categories[{i}]")
        if not isinstance(entry.get("name"), str):
            raise CocoFormatError(path, f"categories[{i}] (id {cat_id}): 'name' must be a string")
        if cat_id in seen:
            raise CocoFormatError(path, f"duplicate category id {cat_id}")
        seen.add(cat_id)
    if not entries:
        raise CocoFormatError(path, "'categories' is empty; a detector needs at least one class")
    return CategoryMap.from_coco_categories(entries)


def _finite_bbox(path: Path, entry: dict, where: str) -> tuple[float, float, float, float]:
    bbox = entry.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in bbox)):
        raise CocoFormatError(path, f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    return float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])


# ---------------------------------------------------------------------------- sources

class ImageSource:
    """Images listed by one file or folder, looked up by image id.

    ``images``: :class:`ImageRecord` list sorted by image id; ``origin``: where they were listed
    (for messages, e.g. ``annotations 'instances_val2017.json'``).
    """

    def __init__(self, images: list[ImageRecord], origin: str):
        self.images = images
        self.origin = origin
        self._by_id = {r.image_id: r for r in images}

    def _repr_details(self) -> list[str]:
        """What a subclass adds to the repr between the image count and the origin."""
        return []

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join([f'{len(self)} images', *self._repr_details(), self.origin])})"

    def get(self, image_id: int) -> ImageRecord:
        try:
            return self._by_id[int(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in {self.origin}") from None

    def subset(self, image_ids, note: str):
        """The same source restricted to ``image_ids`` (``note`` is added to its origin). COCO
        evaluation of a subset counts only its images (``images`` is what evaluators pass on)."""
        keep = {int(i) for i in image_ids}
        part = copy.copy(self)
        part.images = [r for r in self.images if r.image_id in keep]
        part._by_id = {r.image_id: r for r in part.images}
        part.origin = f"{self.origin}, {note}"
        return part


class CocoDetectionSource(ImageSource):
    """A COCO instances file plus its images folder.

    ``images``: :class:`ImageRecord` list sorted by image id; ``categories``: :class:`CategoryMap`;
    ``stats``: counts of boxes read, clipped to the image, dropped as degenerate (side < 1 px after
    clipping), and images without any kept box (kept as background-only images).
    """

    def __init__(self, images_dir: str | os.PathLike, annotations_json: str | os.PathLike):
        self.images_dir = Path(images_dir)
        self.annotations_path = Path(annotations_json)
        path = self.annotations_path
        data = _load_json(path)
        image_entries = _require_list(path, data, "images")
        annotation_entries = _require_list(path, data, "annotations")
        category_entries = _require_list(path, data, "categories")
        super().__init__(_parse_images(path, image_entries, self.images_dir), f"annotations {str(path)!r}")
        self.categories = _parse_categories(path, category_entries)
        self._targets, self.stats = self._parse_annotations(path, annotation_entries)

    def _parse_annotations(self, path: Path, entries: list):
        per_image: dict[int, tuple[list, list, list]] = {i: ([], [], []) for i in self._by_id}
        stats = {"images": len(self.images), "boxes_read": 0, "boxes_kept": 0, "boxes_clipped": 0,
                 "boxes_dropped_degenerate": 0, "crowd_boxes_kept": 0, "images_without_annotations": 0}
        for i, entry in enumerate(entries):
            where = f"annotations[{i}]"
            if not isinstance(entry, dict):
                raise CocoFormatError(path, f"{where} must be an object")
            image_id = _int_field(path, entry, "image_id", where)
            cat_id = _int_field(path, entry, "category_id", where)
            record = self._by_id.get(image_id)
            if record is None:
                raise CocoFormatError(path, f"{where} refers to image id {image_id}, "
                                            "which is not in 'images'")
            if cat_id not in self.categories._label_of:
                raise CocoFormatError(path, f"{where} refers to category id {cat_id}, which is not in "
                                            f"'categories' ({list(self.categories.category_ids)})")
            x, y, w, h = _finite_bbox(path, entry, where)
            crowd = entry.get("iscrowd", 0)
            if crowd not in (0, 1, True, False):
                raise CocoFormatError(path, f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
            stats["boxes_read"] += 1
            x1, y1, x2, y2 = x, y, x + w, y + h
            cx1, cy1 = min(max(x1, 0.0), record.width), min(max(y1, 0.0), record.height)
            cx2, cy2 = min(max(x2, 0.0), record.width), min(max(y2, 0.0), record.height)
            if cx2 - cx1 < MIN_BOX_SIDE or cy2 - cy1 < MIN_BOX_SIDE:
                stats["boxes_dropped_degenerate"] += 1
                continue
            if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                stats["boxes_clipped"] += 1
            boxes, labels, crowds = per_image[image_id]
            boxes.append((cx1, cy1, cx2, cy2))
            labels.append(self.categories._label_of[cat_id])
            crowds.append(bool(crowd))
            stats["boxes_kept"] += 1
            stats["crowd_boxes_kept"] += int(bool(crowd))
        targets = {}
        for image_id, (boxes, labels, crowds) in per_image.items():
            stats["images_without_annotations"] += int(not boxes)
            targets[image_id] = (np.asarray(boxes, np.float32).reshape(-1, 4),
                                 np.asarray(labels, np.int64), np.asarray(crowds, bool))
        return targets, stats

    def _repr_details(self) -> list[str]:
        return [f"{self.categories.num_classes} classes"]

    def targets(self, image_id: int) -> dict[str, np.ndarray]:
        """``boxes float32 [N, 4]`` xyxy original pixels, ``labels int64 [N]``, ``iscrowd bool [N]`` (copies)."""
        self.get(image_id)
        boxes, labels, crowds = self._targets[int(image_id)]
        return {"boxes": boxes.copy(), "labels": labels.copy(), "iscrowd": crowds.copy()}


# ---------------------------------------------------------------------------- unlabeled source

def stable_image_id(relative_name: str) -> int:
    """Image id for a file without a COCO id: ``int(stem)`` for all-digit stems (COCO naming),
    else the top 52 bits of SHA-256 of the relative POSIX file name (stable across runs/machines;
    52 bits stay exact in float64/JSON consumers)."""
    stem = Path(relative_name).stem
    if stem.isdigit() and stem.isascii():
        return int(stem)
    digest = hashlib.sha256(relative_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:7], "big") >> 4


class UnlabeledSource(ImageSource):
    """Images without annotations, from a COCO image-info JSON or from every image in a folder.

    With ``image_info_json`` (e.g. ``image_info_unlabeled2017.json``) only ``"images"`` is read;
    ``"categories"``, if present, is exposed as ``.categories`` (else ``None``). Without it, every
    file in ``images_dir`` whose extension is in :data:`IMAGE_EXTENSIONS` (case-insensitive) is
    used, sorted by relative name, ids from :func:`stable_image_id`, sizes read from the file
    headers (EXIF-oriented; one header read per file). ``images`` is sorted by image id.
    """

    def __init__(self, images_dir: str | os.PathLike, image_info_json: str | os.PathLike | None = None,
                 *, recursive: bool = False):
        self.images_dir = Path(images_dir)
        self.image_info_path = None if image_info_json is None else Path(image_info_json)
        self.categories: CategoryMap | None = None
        if self.image_info_path is not None:
            path = self.image_info_path
            data = _load_json(path)
            super().__init__(_parse_images(path, _require_list(path, data, "images"), self.images_dir),
                             f"image info {str(path)!r}")
            if isinstance(data.get("categories"), list) and data["categories"]:
                self.categories = _parse_categories(path, data["categories"])
        else:
            super().__init__(self._scan_folder(recursive), f"folder {str(self.images_dir)!r}")

    def _scan_folder(self, recursive: bool) -> list[ImageRecord]:
        if not self.images_dir.is_dir():
            raise MissingInputError(f"unlabeled images folder {str(self.images_dir)!r} does not exist")
        pattern = self.images_dir.rglob("*") if recursive else self.images_dir.iterdir()
        names = sorted(p.relative_to(self.images_dir).as_posix() for p in pattern
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not names:
            raise MissingInputError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in "
                                    f"{str(self.images_dir)!r}")
        records: dict[int, ImageRecord] = {}
        for name in names:
            image_id = stable_image_id(name)
            if image_id in records:
                raise ValueError(f"{str(self.images_dir)!r}: files {records[image_id].file_name!r} and "
                                 f"{name!r} map to the same image id {image_id}; rename one of them "
                                 "or list the images in an image-info JSON with explicit ids")
            height, width = image_size(self.images_dir / name)
            records[image_id] = ImageRecord(image_id, name, self.images_dir / name, height, width)
        return sorted(records.values(), key=lambda r: r.image_id)



def check_disjoint_ids(*sources, allow_same_file: bool = True) -> None:
    """Raise ``ValueError`` if two sources share an image id (the teacher cache joins by id).

    Each source needs ``.images`` (records with ``image_id`` and ``path``). With
    ``allow_same_file`` an id shared by records pointing at the same file is the same image
    (e.g. train2017 listed both as labeled data and inside a mixed stream) and is accepted.
    """
    owner: dict[int, tuple[int, ImageRecord]] = {}
    for index, source in enumerate(sources):
        for record in source.images:
            previous = owner.get(record.image_id)
            if previous is None:
                owner[record.image_id] = (index, record)
                continue
            prev_index, prev_record = previous
            if allow_same_file and prev_index != index and (
                    os.path.abspath(prev_record.path) == os.path.abspath(record.path)):
                continue
            prev_origin = getattr(sources[prev_index], "origin", f"source #{prev_index}")
            origin = getattr(source, "origin", f"source #{index}")
            raise ValueError(
                f"image id {record.image_id} is used by {prev_record.file_name!r} in {prev_origin} and by "
                f"{record.file_name!r} in {origin}; the teacher cache joins images by id, so ids must be "
                "unique across all sources. Renumber one dataset's ids (or give unlabeled images an "
                "image-info JSON with distinct ids).")
