"""evaluate(): COCOeval mAP and greedy precision/recall, against COCO and YOLO ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from rich.table import Table

from grounding.formats import export_yolo
from grounding.formats.evaluate import evaluate

CLASSES = ["cat", "dog"]
# Ground-truth category ids deliberately unlike grounding's: mapping is by name.
CATEGORIES = [{"id": 3, "name": "Cat"}, {"id": 7, "name": "DOG"}, {"id": 9, "name": "bird"}]
GT = {  # file name -> (width, height, [(category id, x1, y1, x2, y2)])
    "a.jpg": (100, 80, [(3, 10, 10, 50, 50), (7, 60, 20, 90, 70), (3, 55, 5, 75, 15)]),
    "sub/b.jpg": (64, 64, [(3, 4, 4, 30, 30), (9, 40, 40, 60, 60)]),
    "c.jpg": (50, 50, []),
}
CLASS_OF = {3: 0, 7: 1}


def write_coco(path: Path) -> Path:
    images, anns = [], []
    for i, (name, (w, h, boxes)) in enumerate(GT.items()):
        images.append({"id": 10 + i, "file_name": name, "width": w, "height": h})
        for cat, x1, y1, x2, y2 in boxes:
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": cat,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": CATEGORIES}))
    return path


def perfect_records() -> list[dict]:
    records = []
    for name, (w, h, boxes) in GT.items():
        dets = [{"label": CLASSES[CLASS_OF[c]], "class_id": CLASS_OF[c],
                 "bbox": [float(x1), float(y1), float(x2), float(y2)], "score": None}
                for c, x1, y1, x2, y2 in boxes if c in CLASS_OF]
        records.append({"image": name, "width": w, "height": h, "detections": dets,
                        "points": [], "error": None})
    return records


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture
def coco_gt(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "gt.json")


def by_name(report):
    return {c.name: c for c in report.classes}


def test_perfect_predictions_score_one(coco_gt):
    report = evaluate(perfect_records(), CLASSES, coco_gt)
    assert report.map50 == pytest.approx(1.0) and report.map50_95 == pytest.approx(1.0)
    assert report.precision == 1.0 and report.recall == 1.0
    cat, dog = by_name(report)["cat"], by_name(report)["dog"]
    assert (cat.gt, cat.predicted, cat.true_positives) == (3, 3, 3)
    assert (dog.gt, dog.predicted) == (1, 1)
    assert cat.ap50 == pytest.approx(1.0) and dog.ap50_95 == pytest.approx(1.0)
    assert cat.precision == cat.recall == 1.0
    assert report.images_matched == 3 and report.gt_images_unmatched == 0
    assert report.gt_classes_not_in_list == ["bird"] and report.classes_not_in_gt == []


def test_shifted_box_costs_map50_95_not_map50(coco_gt):
    records = perfect_records()
    dog = records[0]["detections"][1]
    truth = list(dog["bbox"])
    dog["bbox"] = [truth[0] + 3, truth[1] + 5, truth[2] + 3, truth[3] + 5]  # IoU 0.68
    overlap = iou(truth, dog["bbox"])
    assert 0.5 < overlap < 0.95
    report = evaluate(records, CLASSES, coco_gt)
    thresholds = np.linspace(0.5, 0.95, 10)
    dog_ap = float(np.mean(thresholds <= overlap))  # one box: AP is 1 or 0 per threshold
    assert by_name(report)["dog"].ap50_95 == pytest.approx(dog_ap)
    assert by_name(report)["dog"].ap50 == pytest.approx(1.0)
    assert report.map50 == pytest.approx(1.0)
    assert report.map50_95 == pytest.approx((1.0 + dog_ap) / 2)
    assert report.precision == 1.0 and report.recall == 1.0


def test_missing_prediction_lowers_recall(coco_gt):
    records = perfect_records()
    del records[1]["detections"][0]  # the cat on sub/b.jpg
    cat = by_name(evaluate(records, CLASSES, coco_gt))["cat"]
    assert cat.recall == pytest.approx(2 / 3) and cat.precision == 1.0
    assert (cat.gt, cat.predicted, cat.true_positives) == (3, 2, 2)
    assert cat.ap50 < 1.0


def test_false_positive_lowers_precision(coco_gt):
    records = perfect_records()
    records[2]["detections"].append({"label": "cat", "class_id": 0,
                                     "bbox": [1.0, 1.0, 20.0, 20.0], "score": 0.2})
    report = evaluate(records, CLASSES, coco_gt)
    cat = by_name(report)["cat"]
    assert cat.precision == pytest.approx(3 / 4) and cat.recall == 1.0
    assert report.precision == pytest.approx(4 / 5) and report.recall == 1.0
    # Scored lower than every true box, the false positive leaves AP untouched.
    assert cat.ap50 == pytest.approx(1.0)


def test_counts_unmatched_skipped_and_unclassified(coco_gt):
    records = [
        *perfect_records()[:2],
        {"image": "elsewhere/x.jpg", "width": 10, "height": 10, "detections": [],
         "points": [], "error": None},
        {"image": "c.jpg", "width": None, "height": None, "detections": [], "points": [],
         "error": "timeout"},
    ]
    records[0]["detections"].append({"label": "hat", "class_id": None,
                                     "bbox": [1.0, 1.0, 5.0, 5.0], "score": None})
    report = evaluate(records, [*CLASSES, "fish"], coco_gt)
    assert report.images_matched == 2 and report.gt_images_unmatched == 1
    assert report.records_unmatched == 1 and report.records_skipped == 1
    assert report.predictions_without_class == 1
    assert report.classes_not_in_gt == ["fish"]
    assert by_name(report)["fish"].in_gt is False
    assert report.map50 == pytest.approx(1.0)
    assert any("elsewhere/x.jpg" in e for e in report.examples)


def test_size_mismatch_is_left_out(coco_gt):
    records = perfect_records()
    records[0]["width"], records[0]["height"] = 80, 100  # an EXIF-rotated view of a.jpg
    report = evaluate(records, CLASSES, coco_gt)
    assert report.size_mismatches == 1 and report.images_matched == 2
    assert by_name(report)["dog"].gt == 0


def test_yolo_ground_truth_directory(tmp_path):
    root = tmp_path / "images"
    for name, (w, h, _) in GT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), "gray").save(root / name)
    gt_dir = tmp_path / "gt"
    export_yolo(perfect_records(), root, CLASSES, gt_dir, val_fraction=0.5)
    report = evaluate(perfect_records(), CLASSES, gt_dir)
    assert report.images_matched == 3 and report.records_unmatched == 0
    assert report.map50 == pytest.approx(1.0) and report.map50_95 == pytest.approx(1.0)
    assert report.precision == 1.0 and report.recall == 1.0
    assert by_name(report)["cat"].gt == 3


def test_report_dict_and_table(coco_gt):
    report = evaluate(perfect_records(), CLASSES, coco_gt)
    d = report.to_dict()
    assert d["map50"] == pytest.approx(1.0) and d["classes"][0]["name"] == "cat"
    json.dumps(d)
    table = report.table()
    assert isinstance(table, Table)
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    assert "cat" in text and "bird (GT only)" in text and "1.000" in text


def test_hand_made_yolo_dir_nested_paths_and_polygons(tmp_path):
    gt = tmp_path / "gt"
    (gt / "images" / "sub").mkdir(parents=True)
    (gt / "labels" / "sub").mkdir(parents=True)
    (gt / "data.yaml").write_text("names: [Cat, dog]\n")
    Image.new("RGB", (64, 64)).save(gt / "images" / "sub" / "b.jpg")
    # The cat of sub/b.jpg (4, 4, 30, 30) as a polygon row.
    (gt / "labels" / "sub" / "b.txt").write_text(
        "0 0.0625 0.0625 0.46875 0.0625 0.46875 0.46875 0.0625 0.46875\n")
    records = [r for r in perfect_records() if r["image"] == "sub/b.jpg"]
    report = evaluate(records, CLASSES, gt)
    assert report.images_matched == 1 and by_name(report)["cat"].gt == 1
    assert report.map50_95 == pytest.approx(1.0) and report.recall == 1.0
    assert report.classes_not_in_gt == [] and by_name(report)["dog"].ap50 is None
