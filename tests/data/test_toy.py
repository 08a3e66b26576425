"""Toy dataset generator: determinism, layout, ids, boxes (small counts to stay fast)."""

import json

import numpy as np
import pytest
from PIL import Image

from sadpipe.data.coco import CocoDetectionSource, UnlabeledSource, check_disjoint_ids
from sadpipe.data.toy import make_toy_dataset

SMALL = dict(n_train=6, n_val=3, n_unlabeled=5, workers=1)


def _file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    summary = make_toy_dataset(root, seed=3, **SMALL)
    return root, summary


def test_same_seed_identical_bytes_different_seed_differs(toy, tmp_path):
    root, _ = toy
    again = tmp_path / "again"
    make_toy_dataset(again, seed=3, **SMALL)
    first, second = _file_bytes(root), _file_bytes(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)

    other = tmp_path / "other"
    make_toy_dataset(other, seed=4, **SMALL)
    third = _file_bytes(other)
    assert third.keys() == first.keys()
    pngs = [n for n in first if n.endswith(".png")]
    assert all(first[n] != third[n] for n in pngs)


def test_worker_processes_do_not_change_files(toy, tmp_path):
    root, _ = toy
    parallel = tmp_path / "parallel"
    make_toy_dataset(parallel, seed=3, **{**SMALL, "workers": 2})
    assert _file_bytes(parallel) == _file_bytes(root)


def test_layout_counts_and_unique_ids(toy):
    root, summary = toy
    train = CocoDetectionSource(root / "train/images", root / "train/annotations.json")
    val = CocoDetectionSource(root / "val/images", root / "val/annotations.json")
    unlabeled = UnlabeledSource(root / "unlabeled/images", root / "unlabeled/image_info.json")
    assert (len(train), len(val), len(unlabeled)) == (6, 3, 5)
    assert summary["counts"] == {"train": 6, "val": 3, "unlabeled": 5}
    check_disjoint_ids(train, val, unlabeled)
    on_disk = json.loads((root / "toy_dataset.json").read_text())
    assert on_disk["seed"] == 3 and on_disk["counts"] == summary["counts"]
    assert on_disk["objects"]["train"] == train.stats["boxes_kept"]

    # the folder alone gives the same ids (COCO-style digit file names) and sizes
    folder = UnlabeledSource(root / "unlabeled/images")
    assert [(r.image_id, r.height, r.width) for r in folder.images] == \
           [(r.image_id, r.height, r.width) for r in unlabeled.images]
    assert unlabeled.categories == train.categories

    image_info = json.loads((root / "unlabeled/image_info.json").read_text())
    assert "annotations" not in image_info


def test_categories_boxes_and_images(toy):
    root, _ = toy
    source = CocoDetectionSource(root / "train/images", root / "train/annotations.json")
    assert source.categories.num_classes >= 6
    assert source.stats["boxes_clipped"] == 0 and source.stats["boxes_dropped_degenerate"] == 0
    raw = json.loads((root / "train/annotations.json").read_text())
    per_image = {}
    for ann in raw["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 1 and h >= 1
        assert ann["area"] <= w * h  # visible pixels fit in their own box
    assert all(1 <= n <= 6 for n in per_image.values())
    for record in source.images:
        pixels = np.asarray(Image.open(record.path))
        assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
        assert (record.height, record.width) == (128, 128)


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious.txt"):
        make_toy_dataset(tmp_path, **SMALL)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
