"""The tuning hold-out (data.tune_holdout): a fixed part of the labeled train images stands in for val."""

from __future__ import annotations

import random

import pytest
from conftest import REPO, tiny_overrides

from sadpipe.settings import load_settings
from sadpipe.config import ConfigError
from sadpipe.data.dataset import is_held_out, labeled_source
from sadpipe.evaluate import coco_evaluate


def _cfg(root, *extra):
    return load_settings(REPO / "pipelines" / "toy.toml", tiny_overrides(root) + list(extra))


def test_train_and_holdout_split_the_train_images_by_id(toy_root):
    plain = labeled_source(_cfg(toy_root).data, "train")
    cfg = _cfg(toy_root, "data.tune_holdout=0.2")
    train, held = labeled_source(cfg.data, "train"), labeled_source(cfg.data, "val")
    ids, train_ids, held_ids = ({r.image_id for r in s.images} for s in (plain, train, held))
    assert train_ids | held_ids == ids and not train_ids & held_ids
    # membership is a function of the id alone, computed here a second way
    assert held_ids == {i for i in ids if random.Random(f"tune-holdout/{i}").random() < 0.2}
    # about a fifth: binomial(n, 0.2) stays within 5 std of n/5
    n = len(ids)
    assert abs(len(held_ids) - 0.2 * n) < 5 * (n * 0.2 * 0.8) ** 0.5
    # the hold-out carries the train annotations of its images
    some = next(iter(held_ids))
    assert (held.targets(some)["boxes"] == plain.targets(some)["boxes"]).all()
    assert "tuning hold-out" in repr(held)


def test_the_holdout_never_reads_the_val_split(toy_root):
    cfg = _cfg(toy_root, "data.tune_holdout=0.25", 'data.val_images=""', 'data.val_annotations=""')
    held = labeled_source(cfg.data, "val")
    assert all(is_held_out(r.image_id, 0.25) for r in held.images)
    # a hold-out of everything is refused when the settings are built, naming the key
    with pytest.raises(ConfigError, match="tune_holdout"):
        _cfg(toy_root, "data.tune_holdout=1.0")


def test_evaluating_the_holdout_counts_only_its_images(toy_root):
    cfg = _cfg(toy_root, "data.tune_holdout=0.2")
    held = labeled_source(cfg.data, "val")
    # perfect detections for the held-out images only: AP 1 over them (pycocotools restricted by image ids)
    dets = []
    for r in held.images:
        t = held.targets(r.image_id)
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            dets.append({"image_id": r.image_id, "category_id": held.categories.to_category_id(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9})
    metrics = coco_evaluate(str(held.annotations_path), dets, image_ids=[r.image_id for r in held.images])
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-6)
