"""COCO parsing against a small hand-written instances file."""

import copy
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sadpipe.data.coco import (
    CategoryMap, CocoDetectionSource, CocoFormatError, UnlabeledSource, check_disjoint_ids,
    stable_image_id, torchvision_coco91_to_80_channels,
)

# Three images (100 wide x 50 high); categories with non-contiguous ids given out of order.
INSTANCES = {
    "images": [
        {"id": 7, "file_name": "b.jpg", "height": 50, "width": 100},
        {"id": 3, "file_name": "a.jpg", "height": 50, "width": 100},
        {"id": 9, "file_name": "empty.jpg", "height": 50, "width": 100},
    ],
    "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                   {"id": 3, "name": "car"}],
    "annotations": [
        # inside: xywh (10, 5, 20, 30) -> xyxy (10, 5, 30, 35)
        {"id": 1, "image_id": 3, "category_id": 3, "bbox": [10, 5, 20, 30], "iscrowd": 0},
        # crosses the right/bottom border: (90, 40, 20, 20) -> (90, 40, 110, 60) -> clipped (90, 40, 100, 50)
        {"id": 2, "image_id": 3, "category_id": 90, "bbox": [90, 40, 20, 20], "iscrowd": 1},
        # starts left of the image: (-5, 0, 10, 10) -> (-5, 0, 5, 10) -> clipped (0, 0, 5, 10)
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [-5.0, 0.0, 10.0, 10.0]},
        # degenerate: width 0.5 px -> dropped
        {"id": 4, "image_id": 7, "category_id": 1, "bbox": [20, 20, 0.5, 10]},
        # entirely outside (x from 120): clipped to zero width -> dropped
        {"id": 5, "image_id": 7, "category_id": 3, "bbox": [120, 10, 10, 10]},
    ],
}


def _write(tmp_path, data, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_category_map_non_contiguous_ids():
    cmap = CategoryMap.from_coco_categories(INSTANCES["categories"])
    assert cmap.category_ids == (1, 3, 90)  # sorted by id
    assert cmap.names == ("person", "car", "toothbrush")
    assert [cmap.to_label(c) for c in (1, 3, 90)] == [0, 1, 2]
    assert [cmap.to_category_id(k) for k in (0, 1, 2)] == [1, 3, 90]
    assert cmap.num_classes == 3
    assert CategoryMap.from_dict(json.loads(json.dumps(cmap.to_dict()))) == cmap
    with pytest.raises(KeyError, match="category id 2"):
        cmap.to_label(2)
    with pytest.raises(KeyError):
        cmap.to_category_id(3)
    with pytest.raises(ValueError, match="sorted"):
        CategoryMap((3, 1), ("a", "b"))


def test_torchvision_channels_point_at_the_right_names():
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights
    tv_names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # metadata only, no download
    cmap = CategoryMap.from_coco_categories(INSTANCES["categories"])
    channels = torchvision_coco91_to_80_channels(cmap)
    assert [tv_names[c] for c in channels] == list(cmap.names)
    real_ids = [i for i, n in enumerate(tv_names) if n not in ("N/A", "__background__")]
    assert len(real_ids) == 80
    assert torchvision_coco91_to_80_channels(real_ids) == real_ids
    for bad in ([0], [12], [91]):
        with pytest.raises(ValueError, match="no channel"):
            torchvision_coco91_to_80_channels(bad)


def test_targets_conversion_clipping_dropping_and_stats(tmp_path):
    src = CocoDetectionSource(tmp_path / "imgs", _write(tmp_path, INSTANCES))
    assert [r.image_id for r in src.images] == [3, 7, 9]
    assert len(src) == 3
    rec = src.get(7)
    assert rec.file_name == "b.jpg" and rec.path == tmp_path / "imgs" / "b.jpg"
    assert (rec.height, rec.width) == (50, 100)

    t3 = src.targets(3)
    assert t3["boxes"].dtype == np.float32 and t3["labels"].dtype == np.int64 and t3["iscrowd"].dtype == bool
    np.testing.assert_array_equal(t3["boxes"], [[10, 5, 30, 35], [90, 40, 100, 50]])
    np.testing.assert_array_equal(t3["labels"], [1, 2])  # car -> 1, toothbrush -> 2
    np.testing.assert_array_equal(t3["iscrowd"], [False, True])

    t7 = src.targets(7)
    np.testing.assert_array_equal(t7["boxes"], [[0, 0, 5, 10]])
    np.testing.assert_array_equal(t7["labels"], [0])

    t9 = src.targets(9)  # no annotations: kept, empty but well-shaped
    assert t9["boxes"].shape == (0, 4) and t9["labels"].shape == (0,) and t9["iscrowd"].shape == (0,)

    # 5 read; clipped: ids 2 and 3; dropped: ids 4 and 5; kept 3 (one crowd); image 9 empty
    assert src.stats["boxes_read"] == 5
    assert src.stats["boxes_clipped"] == 2
    assert src.stats["boxes_dropped_degenerate"] == 2
    assert src.stats["boxes_kept"] == 3
    assert src.stats["crowd_boxes_kept"] == 1
    assert src.stats["images_without_annotations"] == 1

    src.targets(3)["boxes"][0, 0] = -1  # callers get copies
    assert src.targets(3)["boxes"][0, 0] == 10
    with pytest.raises(KeyError, match="image id 4"):
        src.targets(4)


def _mutated(fn):
    data = copy.deepcopy(INSTANCES)
    fn(data)
    return data


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("images"), "missing key 'images'"),
    (lambda d: d.pop("annotations"), "missing key 'annotations'"),
    (lambda d: d.pop("categories"), "missing key 'categories'"),
    (lambda d: d["annotations"][0].update(image_id=1234), "image id 1234"),
    (lambda d: d["annotations"][0].update(category_id=55), "category id 55"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "4 finite numbers"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3, "4"]), "4 finite numbers"),
    (lambda d: d["images"].append({"id": 3, "file_name": "dup.jpg", "height": 5, "width": 5}),
     "duplicate image id 3"),
    (lambda d: d["images"][0].update(width=0), "'width' must be positive"),
    (lambda d: d["categories"].append({"id": 1, "name": "again"}), "duplicate category id 1"),
])
def test_malformed_instances_name_the_file(tmp_path, mutate, message):
    path = _write(tmp_path, _mutated(mutate), name="broken_instances.json")
    with pytest.raises(CocoFormatError, match=message) as info:
        CocoDetectionSource(tmp_path, path)
    assert str(path) in str(info.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "images": [\n    {"id": 1,, }\n  ]\n}\n')  # 4 spaces, {"id": 1, then the 2nd comma is line 3, column 14
    with pytest.raises(CocoFormatError, match=r"line 3, column 14") as info:
        CocoDetectionSource(tmp_path, path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetectionSource(tmp_path, tmp_path / "nope.json")


def test_unlabeled_from_image_info(tmp_path):
    info = {"images": [{"id": 11, "file_name": "x.jpg", "height": 4, "width": 6},
                       {"id": 5, "file_name": "y.jpg", "height": 8, "width": 2}],
            "categories": INSTANCES["categories"]}
    src = UnlabeledSource(tmp_path / "u", _write(tmp_path, info, "image_info.json"))
    assert [r.image_id for r in src.images] == [5, 11]
    assert src.get(11).path == tmp_path / "u" / "x.jpg"
    assert src.categories.category_ids == (1, 3, 90)
    with pytest.raises(CocoFormatError, match="missing key 'images'"):
        UnlabeledSource(tmp_path, _write(tmp_path, {"categories": []}, "bad_info.json"))


def test_unlabeled_folder_ids_and_sizes(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (6, 4)).save(folder / "000000000042.jpg")
    Image.new("RGB", (3, 5)).save(folder / "Holiday Photo.PNG")  # upper-case extension counts
    (folder / "readme.txt").write_text("not an image")
    src = UnlabeledSource(folder)
    names = {r.file_name: r for r in src.images}
    assert set(names) == {"000000000042.jpg", "Holiday Photo.PNG"}
    assert names["000000000042.jpg"].image_id == 42  # COCO naming: the digits are the id
    # independent hash: top 52 bits of SHA-256 = first 13 hex digits
    expected = int(hashlib.sha256(b"Holiday Photo.PNG").hexdigest()[:13], 16)
    assert names["Holiday Photo.PNG"].image_id == expected == stable_image_id("Holiday Photo.PNG")
    assert expected < 2 ** 52
    assert (names["Holiday Photo.PNG"].height, names["Holiday Photo.PNG"].width) == (5, 3)
    assert [r.image_id for r in src.images] == sorted(r.image_id for r in src.images)

    Image.new("RGB", (2, 2)).save(folder / "42.png")  # same digits -> same id: refused
    with pytest.raises(ValueError, match="same image id 42"):
        UnlabeledSource(folder)


def test_check_disjoint_ids(tmp_path):
    labeled = CocoDetectionSource(tmp_path / "imgs", _write(tmp_path, INSTANCES))
    info = {"images": [{"id": 7, "file_name": "other.jpg", "height": 4, "width": 6}]}
    clashing = UnlabeledSource(tmp_path / "u", _write(tmp_path, info, "info.json"))
    with pytest.raises(ValueError, match="image id 7") as err:
        check_disjoint_ids(labeled, clashing)
    assert "info.json" in str(err.value) and "instances.json" in str(err.value)

    disjoint = UnlabeledSource(tmp_path / "u", _write(
        tmp_path, {"images": [{"id": 100, "file_name": "z.jpg", "height": 4, "width": 6}]}, "ok.json"))
    check_disjoint_ids(labeled, disjoint)
    # the same file under the same id in two sources is the same image
    same = UnlabeledSource(tmp_path / "imgs", _write(
        tmp_path, {"images": [{"id": 7, "file_name": "b.jpg", "height": 50, "width": 100}]}, "same.json"))
    check_disjoint_ids(labeled, same)
    with pytest.raises(ValueError):
        check_disjoint_ids(labeled, same, allow_same_file=False)
