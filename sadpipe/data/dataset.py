"""Torch datasets: images + annotations (+ teacher cache records), joined by image id.

A sample is a dict (docs/architecture.md): the normalised image at its deterministic size,
its boxes in resized pixels, and its geometry. Flipping is decided per sample from a seeded
generator keyed by (seed, epoch, image_id), so a resumed run sees the same flips.
"""

from __future__ import annotations

import random
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..transforms import Preprocess, hflip, pad_batch, scale_boxes
from .coco import CocoDetectionSource, UnlabeledSource
from .images import read_image


class DataConfigError(UserError, ValueError):
    pass


def labeled_source(data, split: str) -> CocoDetectionSource:
    """The labeled images of ``data`` (a ``settings.DataConfig``), split 'train' or 'val'.
    Raises DataConfigError naming the missing keys.

    With ``data.tune_holdout = f > 0`` both come from the train split: 'val' is the held-out
    fraction f of its images (:func:`is_held_out`), 'train' the rest."""
    holdout = float(data.tune_holdout)
    read_split = "train" if holdout > 0 else split
    images, ann = data.path(f"{read_split}_images"), data.path(f"{read_split}_annotations")
    if images is None or ann is None:
        raise DataConfigError(f"data.{read_split}_images and data.{read_split}_annotations must be set in the config "
                              f"(or with --set data.{read_split}_images=DIR --set data.{read_split}_annotations=FILE)")
    if holdout <= 0:
        return CocoDetectionSource(images, ann)
    # tuning mode: "val" is a held-out part of the labeled train images, never the real val split
    train = CocoDetectionSource(images, ann)
    held = {r.image_id for r in train.images if is_held_out(r.image_id, holdout)}
    if split == "val":
        return train.subset(held, f"tuning hold-out ({holdout:g} of the train images)")
    return train.subset({r.image_id for r in train.images} - held, f"without the tuning hold-out ({holdout:g})")


def is_held_out(image_id: int, fraction: float) -> bool:
    """Whether a labeled train image belongs to the tuning hold-out: decided by its id alone
    (seeded hash), so the split is the same in every run and process and for any file order."""
    return random.Random(f"tune-holdout/{int(image_id)}").random() < fraction


def unlabeled_source(data) -> UnlabeledSource | None:
    """The unlabeled images of ``data`` (a ``settings.DataConfig``), or None when it has none."""
    images = data.path("unlabeled_images")
    if images is None:
        return None
    return UnlabeledSource(images, data.path("unlabeled_annotations"))


def flip_decision(seed: int, epoch: int, image_id: int) -> bool:
    # a string seed is hashed with sha512 by random.Random: stable across processes and runs
    return random.Random(f"{seed}/{epoch}/{image_id}").random() < 0.5


class DetectionDataset(Dataset):
    """Labeled images (with targets) or unlabeled ones (``source`` without ``targets``).

    ``image_ids`` fixes the subset and order; ``hflip`` in {False, True, "always"}.
    """

    def __init__(self, source, preprocess: Preprocess, *, image_ids: list[int] | None = None,
                 hflip: bool | str = False, seed: int = 0):
        self.source = source
        self.preprocess = preprocess
        self.image_ids = list(image_ids) if image_ids is not None else [r.image_id for r in source.images]
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.labeled = hasattr(source, "targets")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def view_of(self, image_id: int) -> str:
        if self.hflip == "always":
            return "hflip"
        if self.hflip and flip_decision(self.seed, self.epoch, image_id):
            return "hflip"
        return "orig"

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        record = self.source.get(image_id)
        image = read_image(record.path)
        if self.labeled:
            t = self.source.targets(image_id)
            boxes, labels, iscrowd = t["boxes"].astype(np.float32), t["labels"], t["iscrowd"]
        else:
            boxes = np.zeros((0, 4), np.float32)
            labels, iscrowd = np.zeros((0,), np.int64), np.zeros((0,), bool)
        view = self.view_of(image_id)
        if view == "hflip":
            image, boxes = hflip(image, boxes)
        orig_hw = image.shape[:2]
        size, padded = self.preprocess.sizes(*orig_hw)
        return {
            "image_id": image_id, "image": self.preprocess(image), "view": view, "labeled": self.labeled,
            "boxes": torch.from_numpy(scale_boxes(boxes, orig_hw, size)), "labels": torch.as_tensor(labels, dtype=torch.int64),
            "iscrowd": torch.as_tensor(iscrowd, dtype=torch.bool), "orig_size": tuple(orig_hw), "size": size,
            "padded_size": padded, "path": str(record.path),
        }


def collate(samples: list[dict]) -> dict:
    """Pad images onto one canvas; everything else stays per-sample lists."""
    images, canvas = pad_batch([s["image"] for s in samples], [s["padded_size"] for s in samples])
    batch = {k: [s[k] for s in samples] for k in samples[0] if k != "image"}
    batch["images"] = images
    batch["canvas"] = canvas
    return batch


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)

