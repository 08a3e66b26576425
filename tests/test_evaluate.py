import json
import math

import pytest
import torch
from pycocotools.coco import COCO

from sadpipe.evaluate import coco_evaluate, detections_to_coco, format_metrics_table

# Two 100x100 images, two categories (ids 3 and 7), all boxes 40x40 (area 1600,
# "medium": 32**2 < 1600 < 96**2), so APs and APl have no GT and are undefined.
GT_BOXES = {
    1: [(3, [10, 10, 40, 40]), (7, [55, 50, 40, 40])],
    2: [(3, [30, 20, 40, 40])],
}


def _gt_dict():
    annotations = []
    for image_id, anns in GT_BOXES.items():
        for category_id, bbox in anns:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in GT_BOXES],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": annotations,
    }


@pytest.fixture()
def gt_path(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_gt_dict()))
    return path


def _gt_as_detections(shift_fraction=0.0):
    return [
        {"image_id": i, "category_id": c, "bbox": [x + shift_fraction * w, y, w, h], "score": 1.0}
        for i, anns in GT_BOXES.items()
        for c, (x, y, w, h) in anns
    ]


def test_gt_as_predictions_is_perfect(gt_path, capsys):
    metrics = coco_evaluate(gt_path, _gt_as_detections())
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    assert metrics["APm"] == pytest.approx(1.0)
    # No small or large GT: pycocotools' -1 is reported as NaN.
    assert math.isnan(metrics["APs"]) and math.isnan(metrics["APl"])
    assert capsys.readouterr().out == ""  # pycocotools silenced


def test_shifted_boxes_drop_ap75_keep_ap50(gt_path):
    # Shift every box right by 0.2 * w = 8 px: intersection 32 x 40 = 1280,
    # union 1600 + 1600 - 1280 = 1920, IoU = 1280 / 1920 = 0.667.
    # 0.5 <= 0.667 < 0.75 -> AP50 = 1, AP75 = 0; matched at thresholds
    # 0.50, 0.55, 0.60, 0.65 (4 of the 10) -> AP = 0.4.
    detections = _gt_as_detections(shift_fraction=0.2)
    original = json.dumps(detections)
    metrics = coco_evaluate(COCO(str(gt_path)), detections)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(0.4)
    assert json.dumps(detections) == original  # input not mutated by pycocotools


def test_per_iou_ap_by_hand(gt_path):
    # The same shifted boxes (IoU 0.667 with their GT): matched at thresholds 0.50 ... 0.65 (AP 1
    # there), missed at 0.70 ... 0.95 (AP 0); their mean is the summary AP (0.4).
    metrics = coco_evaluate(gt_path, _gt_as_detections(shift_fraction=0.2), per_iou=True)
    per_iou = {k: v for k, v in metrics.items() if k.startswith("AP@")}
    assert list(per_iou) == [f"AP@{0.5 + 0.05 * i:.2f}" for i in range(10)]
    assert [per_iou[k] for k in per_iou] == pytest.approx([1.0] * 4 + [0.0] * 6)
    assert sum(per_iou.values()) / 10 == pytest.approx(metrics["AP"])
    # one of category 3's two objects found, at IoU 1: 51/101 for cat 3, 1 for cat 7 at every threshold
    one = coco_evaluate(gt_path, [d for d in _gt_as_detections() if d["image_id"] == 1], per_iou=True)
    assert one["AP@0.95"] == pytest.approx((51 / 101 + 1) / 2) and one["AP@0.50"] == pytest.approx(one["AP50"])
    assert set(coco_evaluate(gt_path, []).keys()) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}  # off by default
    assert coco_evaluate(gt_path, [], per_iou=True)["AP@0.50"] == 0.0


def test_empty_detections_give_zero(gt_path):
    metrics = coco_evaluate(gt_path, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AP75"] == 0.0 and metrics["APm"] == 0.0
    assert math.isnan(metrics["APs"])


def test_image_ids_restrict_evaluation(gt_path):
    # Only image 1's detections, evaluated on image 1 only: perfect.
    detections = [d for d in _gt_as_detections() if d["image_id"] == 1]
    assert coco_evaluate(gt_path, detections, image_ids=[1])["AP"] == pytest.approx(1.0)
    # Evaluated on both images, category 3 misses one of its two objects:
    # recall 0.5 at precision 1 -> 101-point AP = 51/101 for cat 3, 1.0 for cat 7,
    # mean = (51/101 + 1) / 2 = 0.752475.
    assert coco_evaluate(gt_path, detections)["AP"] == pytest.approx((51 / 101 + 1) / 2)


def test_unknown_images_and_missing_file_raise(gt_path, tmp_path):
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt_path, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_evaluate(tmp_path / "missing.json", [])


def test_detections_to_coco_converts_boxes_and_labels():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.5, 4.0]])
    scores = torch.tensor([0.9, 0.25])
    labels = torch.tensor([0, 1])
    out = detections_to_coco(42, boxes, scores, labels, {0: 3, 1: 7}.__getitem__)
    # [10, 20, 50, 80] -> x 10, y 20, w 50 - 10 = 40, h 80 - 20 = 60
    assert out[0] == {"image_id": 42, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 60.0], "score": pytest.approx(0.9)}
    assert out[1]["bbox"] == [0.0, 0.0, 5.5, 4.0] and out[1]["category_id"] == 7
    assert detections_to_coco(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), int) == []


def test_detections_to_coco_round_trip_is_perfect(gt_path):
    # xyxy boxes built from the GT -> converted -> evaluated: AP 1.
    detections = []
    for image_id, anns in GT_BOXES.items():
        boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in anns], dtype=torch.float32)
        labels = torch.tensor([0 if c == 3 else 1 for c, _ in anns])
        detections += detections_to_coco(image_id, boxes, torch.ones(len(anns)), labels, [3, 7].__getitem__)
    assert coco_evaluate(gt_path, detections)["AP"] == pytest.approx(1.0)


def test_format_metrics_table_contains_numbers():
    rows = {
        "teacher": {"AP": 0.3612, "AP50": 0.5, "AP75": 0.38, "APs": math.nan, "APm": 0.4, "APl": 0.45},
        "student+ADL": {"AP": 0.365, "AP50": 0.55},
    }
    table = format_metrics_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    teacher = lines[2].split()
    # 0.3612 -> 36.1 %, NaN -> "-"
    assert teacher == ["teacher", "36.1", "50.0", "38.0", "-", "40.0", "45.0"]
    assert lines[3].split() == ["student+ADL", "36.5", "55.0", "-", "-", "-", "-"]
    # All lines equally wide (aligned).
    assert len({len(line) for line in lines}) == 1
    single = format_metrics_table({"only": {"AP": 0.25}}, percent=False, digits=3)
    assert single.splitlines()[2].split() == ["only", "0.250"]
