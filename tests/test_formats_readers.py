"""load_coco / load_yolo: exports read back to the same boxes; malformed input left out
with a reason naming the file and the entry; one image-extension list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from grounding.formats import dataset as dataset_module
from grounding.formats import export_coco, export_yolo
from grounding.formats.coco import load_coco
from grounding.formats.dataset import Dataset, DatasetBox, DatasetError
from grounding.formats.evaluate import evaluate
from grounding.formats.yolo import flat_name, is_val, load_yolo
from grounding.io.images import IMAGE_EXTENSIONS
from grounding.runs import rundir
from grounding.runs.rundir import find_images

CLASSES = ["cat", "dog"]


def det(class_id, bbox, score=None):
    return {"label": CLASSES[class_id] if class_id is not None else "thing",
            "class_id": class_id, "bbox": [float(v) for v in bbox], "score": score}


def rec(image, w, h, dets=()):
    return {"image": image, "width": w, "height": h, "detections": list(dets), "points": [],
            "error": None}


def save_rotated_jpeg(path: Path, displayed_size: tuple[int, int]) -> None:
    """A JPEG stored turned, with EXIF orientation 6 showing ``displayed_size``."""
    stored = Image.new("RGB", displayed_size, "gray").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", exif=exif)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Images up to 100 px wide (YOLO's 6 decimals then stay within 1e-4 px), boxes with
    awkward fractions, an EXIF-rotated image, an image without boxes."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (100, 80), "gray").save(root / "a.jpg")
    Image.new("RGB", (97, 61), "gray").save(root / "sub" / "b.png")
    Image.new("RGB", (30, 20), "gray").save(root / "sub" / "c.jpg")
    save_rotated_jpeg(root / "rot.jpg", (40, 60))
    records = [
        rec("a.jpg", 100, 80, [det(0, [10, 10, 50, 50]), det(1, [30.5, 20.25, 99.9, 79.3], 0.9),
                               det(0, [0, 0, 100, 80])]),
        rec("sub/b.png", 97, 61, [det(1, [1 / 3, 2 / 7, 96.123456, 60.987654], 0.4),
                                  det(None, [0, 0, 10, 10])]),
        rec("sub/c.jpg", 30, 20),
        rec("rot.jpg", 40, 60, [det(0, [5, 10, 30, 40])]),
    ]
    return root, records


def expected_boxes(record: dict) -> list[tuple]:
    return sorted((d["class_id"], *d["bbox"]) for d in record["detections"]
                  if d["class_id"] is not None)


def read_boxes(image, class_of) -> list[tuple]:
    return sorted((class_of[b.category_id], b.x1, b.y1, b.x2, b.y2) for b in image.boxes)


def assert_boxes_close(got: list[tuple], want: list[tuple], tol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0]
        assert g[1:] == pytest.approx(w[1:], abs=tol)


# --- Round trips ---------------------------------------------------------------------------


def test_coco_export_reads_back_to_the_same_boxes(source, tmp_path):
    root, records = source
    out = tmp_path / "coco"
    export_coco(records, root, CLASSES, out)
    data = load_coco(out / "annotations.json")
    assert isinstance(data, Dataset)
    assert data.names == {1: "cat", 2: "dog"}
    assert data.skipped == 0 and data.warnings == []
    class_of = {cid: CLASSES.index(name) for cid, name in data.names.items()}
    by_path = {im.path: im for im in data.images}
    assert set(by_path) == {r["image"] for r in records}
    for r in records:
        image = by_path[r["image"]]
        assert (image.width, image.height) == (r["width"], r["height"])
        assert_boxes_close(read_boxes(image, class_of), expected_boxes(r), 1e-9)
        assert all(isinstance(b, DatasetBox) and b.iscrowd is False for b in image.boxes)


def test_coco_absolute_file_names_made_relative_to_images_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({
        "images": [{"id": 1, "file_name": str(root / "x" / "a.jpg"), "width": 10, "height": 10}],
        "annotations": [], "categories": []}))
    assert load_coco(gt, images_root=root).images[0].path == "x/a.jpg"
    assert load_coco(gt).images[0].path == (root / "x" / "a.jpg").as_posix()


def test_yolo_export_reads_back_to_the_same_boxes(source, tmp_path):
    root, records = source
    out = tmp_path / "yolo"
    export_yolo(records, root, CLASSES, out, val_fraction=0.5)
    data = load_yolo(out)
    assert data.names == {0: "cat", 1: "dog"}
    assert data.skipped == 0 and data.warnings == []
    by_path = {im.path: im for im in data.images}
    assert len(by_path) == len(records)
    for r in records:
        split = "val" if is_val(r["image"], 0.5, 0) else "train"
        image = by_path[f"{split}/{flat_name(r['image'])}"]
        assert (image.width, image.height) == (r["width"], r["height"])  # rot.jpg: 40x60
        assert_boxes_close(read_boxes(image, {0: 0, 1: 1}), expected_boxes(r), 1e-4)


def test_yolo_polygon_rows_and_trailing_score(tmp_path):
    gt = yolo_dir(tmp_path, {"a.jpg": (64, 32)}, {
        "a.txt": "0 0.0625 0.125 0.5 0.125 0.5 0.75 0.0625 0.75\n"
                 "1 0.5 0.5 0.25 0.5 0.87\n\n"})
    boxes = load_yolo(gt).images[0].boxes
    assert boxes[0] == DatasetBox(0, 4.0, 4.0, 32.0, 24.0)
    assert boxes[1] == DatasetBox(1, 24.0, 8.0, 40.0, 24.0)


# --- Malformed COCO ------------------------------------------------------------------------


def coco_file(tmp_path: Path, **changes) -> Path:
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40]}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    for key, extra in changes.items():
        data[key] = data[key] + extra
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def only_warning(data: Dataset) -> str:
    assert data.skipped == 1 and len(data.warnings) == 1, data.warnings
    return data.warnings[0]


def test_coco_json_list_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(DatasetError, match=r"results\.json.*JSON list"):
        load_coco(path)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not a JSON file"),
    ('{"annotations": []}', 'no "images"'),
    ('{"images": {}, "annotations": []}', '"images" must be a list'),
])
def test_coco_unusable_files_raise(tmp_path, text, match):
    path = tmp_path / "gt.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match=match) as info:
        load_coco(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI's `except ValueError` still applies


def test_coco_annotation_without_image_id(tmp_path):
    path = coco_file(tmp_path, annotations=[{"id": 9, "category_id": 3, "bbox": [1, 1, 2, 2]}])
    data = load_coco(path)
    assert only_warning(data) == f"{path}: annotations[1] (id 9): no image_id"
    assert sum(len(im.boxes) for im in data.images) == 1


def test_coco_unknown_category_id(tmp_path):
    path = coco_file(tmp_path, annotations=[{"id": 9, "image_id": 2, "category_id": 5,
                                             "bbox": [1, 1, 2, 2]}])
    warning = only_warning(load_coco(path))
    assert warning.startswith(f"{path}: annotations[1] (id 9): category_id 5 is not in categories")


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5], [1, "2", 3, 4], [1, 2, None, 4],
                                  "1 2 3 4", None, [1, 2, float("nan"), 4], [1, 2, True, 4]])
def test_coco_bbox_not_four_numbers(tmp_path, bbox):
    path = coco_file(tmp_path, annotations=[{"id": 9, "image_id": 2, "category_id": 3,
                                             "bbox": bbox}])
    warning = only_warning(load_coco(path))
    assert warning.startswith(f"{path}: annotations[1] (id 9): bbox must be 4 numbers")


def test_coco_other_malformed_entries(tmp_path):
    path = coco_file(
        tmp_path,
        annotations=[{"id": 10, "image_id": 99, "category_id": 3, "bbox": [1, 1, 2, 2]},
                     {"id": 11, "image_id": 2, "category_id": 3, "bbox": [1, 1, -2, 2]},
                     "not an object",
                     {"id": 12, "image_id": 3, "category_id": 3, "bbox": [1, 1, 2, 2]}],
        images=[{"id": 3, "file_name": "c.jpg", "width": 0, "height": 10},
                {"id": 1, "file_name": "dup.jpg", "width": 5, "height": 5},
                {"file_name": "noid.jpg", "width": 5, "height": 5}],
        categories=[{"name": "no id"}, {"id": 3, "name": "again"}])
    data = load_coco(path)
    reasons = {w.removeprefix(f"{path}: ") for w in data.warnings}
    assert reasons == {
        "categories[2]: id must be a whole number, got None",
        "categories[3]: id 3 already used by 'cat'",
        "images[2] (id 3): width and height must be whole numbers > 0, got 0 x 10",
        "images[3] (id 1): id 1 already used by an earlier image",
        "images[4]: id must be a whole number, got None",
        "annotations[1] (id 10): image_id 99 is not the id of any (usable) image",
        "annotations[2] (id 11): bbox has a negative width or height: [1, 1, -2, 2]",
        "annotations[3]: not an object: 'not an object'",
        "annotations[4] (id 12): image_id 3 is not the id of any (usable) image",
    }
    assert data.skipped == 9
    assert [im.path for im in data.images] == ["a.jpg", "b.jpg"]
    assert data.names == {3: "cat", 7: "dog"}
    assert data.images[0].boxes == [DatasetBox(3, 10.0, 10.0, 50.0, 50.0)]


def test_warnings_are_capped_but_all_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "MAX_WARNINGS", 3)
    path = coco_file(tmp_path, annotations=[{"id": i, "category_id": 3, "bbox": [1, 1, 2, 2]}
                                            for i in range(10, 20)])
    data = load_coco(path)
    assert data.skipped == 10 and len(data.warnings) == 3


# --- Malformed YOLO ------------------------------------------------------------------------


def yolo_dir(tmp_path: Path, images: dict[str, tuple[int, int]], labels: dict[str, str],
             names: str = "names: [cat, dog]\n") -> Path:
    root = tmp_path / "gt"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text(names)
    for name, size in images.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(root / "images" / name)
    for name, text in labels.items():
        (root / "labels" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "labels" / name).write_text(text)
    return root


@pytest.mark.parametrize("line, reason", [
    ("0 0.5 0.5 0.2", "4 values; a box row is 5 numbers"),
    ("0 0.5 0.5 0.2 0.2 0.9 0.1 0.3", "8 values; a box row is 5 numbers"),
    ("0 0.5 0.5 1.2 0.2", "values outside 0..1"),
    ("0 -0.1 0.5 0.2 0.2", "values outside 0..1"),
    ("0 0.5 0.5 0.2 nan", "not finite numbers"),
    ("cat 0.5 0.5 0.2 0.2", "not numbers: 'cat 0.5 0.5 0.2 0.2'"),
    ("0.5 0.5 0.5 0.2 0.2", "class must be a whole number >= 0, got '0.5'"),
    ("2 0.5 0.5 0.2 0.2", "class 2 is not in data.yaml names (2 classes)"),
])
def test_yolo_malformed_line_is_left_out_with_file_and_line(tmp_path, line, reason):
    root = yolo_dir(tmp_path, {"sub/a.jpg": (40, 20)},
                    {"sub/a.txt": f"1 0.5 0.5 0.5 0.5\n\n{line}\n"})
    data = load_yolo(root)
    warning = only_warning(data)
    assert warning.startswith(f"{root / 'labels' / 'sub' / 'a.txt'}:3: {reason}")
    assert data.images[0].path == "sub/a.jpg"
    assert data.images[0].boxes == [DatasetBox(1, 10.0, 5.0, 30.0, 15.0)]


def test_yolo_unreadable_image_and_orphan_label(tmp_path):
    root = yolo_dir(tmp_path, {"a.jpg": (10, 10)},
                    {"a.txt": "0 0.5 0.5 1 1\n", "broken.txt": "0 0.5 0.5 1 1\n",
                     "gone.txt": "0 0.5 0.5 1 1\n"})
    (root / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    data = load_yolo(root)
    assert [im.path for im in data.images] == ["a.jpg"]
    assert data.skipped == 2
    assert data.warnings[0].startswith(f"{root / 'images' / 'broken.jpg'}: cannot read the image")
    assert data.warnings[1].startswith(f"{root / 'labels' / 'gone.txt'}: no image for this label")


@pytest.mark.parametrize("yaml_text, match", [
    (None, "no data.yaml"),
    ("- cat\n- dog\n", "must be a YAML mapping"),
    ("nc: 2\n", "no names"),
    ("names: cat\n", "names must be a list or a mapping"),
    ("names: {a: cat}\n", "names key 'a' is not a class index"),
    ("names: [cat\n", "not YAML"),
])
def test_yolo_unusable_data_yaml_raises(tmp_path, yaml_text, match):
    root = yolo_dir(tmp_path, {}, {})
    if yaml_text is None:
        (root / "data.yaml").unlink()
    else:
        (root / "data.yaml").write_text(yaml_text)
    with pytest.raises(DatasetError, match=match) as info:
        load_yolo(root)
    assert str(root) in str(info.value)


def test_yolo_names_as_mapping_and_no_images_folder(tmp_path):
    root = yolo_dir(tmp_path, {"a.png": (8, 8)}, {"a.txt": "5 0.5 0.5 1 1\n"},
                    names="names:\n  0: cat\n  '5': fish\n")
    data = load_yolo(root)
    assert data.names == {0: "cat", 5: "fish"} and data.skipped == 0
    assert data.images[0].boxes == [DatasetBox(5, 0.0, 0.0, 8.0, 8.0)]
    for p in sorted((root / "images").iterdir()):
        p.unlink()
    (root / "images").rmdir()
    with pytest.raises(DatasetError, match="no images/ folder"):
        load_yolo(root)


# --- evaluate exposes what the readers left out --------------------------------------------


def test_evaluate_reports_ground_truth_left_out(tmp_path):
    path = coco_file(tmp_path, annotations=[{"id": 9, "category_id": 3, "bbox": [1, 1, 2, 2]}])
    records = [rec("a.jpg", 100, 80, [det(0, [10, 10, 50, 50])]), rec("b.jpg", 50, 50)]
    report = evaluate(records, CLASSES, path)
    assert report.map50 == pytest.approx(1.0) and report.recall == 1.0
    assert report.gt_skipped == 1
    assert report.gt_warnings == [f"{path}: annotations[1] (id 9): no image_id"]
    d = report.to_dict()
    assert d["gt_skipped"] == 1 and d["gt_warnings"] == report.gt_warnings
    json.dumps(d)


def test_evaluate_clean_ground_truth_has_no_warnings(tmp_path):
    report = evaluate([rec("a.jpg", 100, 80, [det(0, [10, 10, 50, 50])])], CLASSES,
                      coco_file(tmp_path))
    assert report.gt_skipped == 0 and report.gt_warnings == []


# --- One image-extension list --------------------------------------------------------------


def test_one_extension_list_for_labelling_and_yolo(tmp_path):
    assert rundir.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".mpo"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    Image.init()
    readable = set(Image.registered_extensions())
    assert readable >= IMAGE_EXTENSIONS  # every listed suffix has a PIL decoder
    root = yolo_dir(tmp_path, {"a.TIF": (8, 8), "b.png": (8, 8)}, {})
    (root / "images" / "c.mpo").write_bytes((root / "images" / "b.png").read_bytes())
    (root / "images" / "notes.txt").write_text("not an image")
    found = sorted(find_images(root / "images"))
    assert found == ["a.TIF", "b.png", "c.mpo"]
    assert sorted(im.path for im in load_yolo(root).images) == found
