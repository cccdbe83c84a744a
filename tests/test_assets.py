"""assets/ground_truth.json: hand-drawn boxes for every sample image, in the displayed frame.

The GPU acceptance check (bench/gpu_check.py) and `grounding eval` read it; a box drawn in
the stored frame of the EXIF-rotated cat, or an image left out, would fail a good model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from grounding import load_image
from grounding.formats.evaluate import IMAGE_EXTENSIONS, evaluate

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGES = ASSETS / "images"
GROUND_TRUTH = ASSETS / "ground_truth.json"


@pytest.fixture(scope="module")
def coco():
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it loads
        return COCO(str(GROUND_TRUTH))


def test_says_what_it_is(coco):
    description = coco.dataset["info"]["description"].lower()
    assert "hand-drawn" in description and "displayed" in description


def test_every_sample_image_has_its_displayed_size(coco):
    entries = {im["file_name"]: im for im in coco.dataset["images"]}
    files = sorted(p.name for p in IMAGES.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert sorted(entries) == files
    for name in files:
        im = entries[name]
        assert (im["width"], im["height"]) == load_image(IMAGES / name).size, name
    assert (entries["cat_exif_rotated.jpg"]["width"],
            entries["cat_exif_rotated.jpg"]["height"]) == (451, 300)


def test_every_image_has_boxes_and_every_box_lies_inside_it(coco):
    for image_id, im in coco.imgs.items():
        anns = coco.imgToAnns[image_id]
        assert anns, im["file_name"]
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0, ann
            assert x >= 0 and y >= 0, ann
            assert x + w <= im["width"] and y + h <= im["height"], ann
            assert ann["area"] == pytest.approx(w * h) and ann["iscrowd"] == 0


def test_obvious_objects_are_there(coco):
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    have = {(coco.imgs[a["image_id"]]["file_name"], names[a["category_id"]])
            for a in coco.dataset["annotations"]}
    assert {("astronaut.jpg", "person"), ("coffee.jpg", "cup"), ("coffee.jpg", "saucer"),
            ("coffee.jpg", "spoon"), ("cat_exif_rotated.jpg", "cat"),
            ("cat_exif_rotated.jpg", "cat face"), ("rocket.jpg", "rocket"),
            ("cameraman.jpg", "person"), ("cameraman.jpg", "camera"),
            ("cameraman.jpg", "tripod"), ("receipt.jpg", "receipt")} <= have


def test_grounding_eval_matches_it_with_the_images_folder_as_root():
    """Records of the ground truth itself, named by absolute path as `grounding label`
    writes them, score a perfect 1.0: every file name matches."""
    data = json.loads(GROUND_TRUTH.read_text(encoding="utf-8"))
    classes = [c["name"] for c in data["categories"]]
    names = {c["id"]: c["name"] for c in data["categories"]}
    records = []
    for im in data["images"]:
        detections = [{"class_id": classes.index(names[a["category_id"]]),
                       "bbox": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                a["bbox"][1] + a["bbox"][3]]}
                      for a in data["annotations"] if a["image_id"] == im["id"]]
        records.append({"image": str(IMAGES / im["file_name"]), "width": im["width"],
                        "height": im["height"], "detections": detections})
    report = evaluate(records, classes, GROUND_TRUTH, images_root=IMAGES)
    assert report.images_matched == len(data["images"])
    assert report.gt_images_unmatched == report.size_mismatches == 0
    assert report.map50 == pytest.approx(1.0) and report.recall == pytest.approx(1.0)
