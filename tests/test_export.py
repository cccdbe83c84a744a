"""Exporters checked with the real readers: pycocotools, supervision, YAML, XML."""

from __future__ import annotations

import io
import json
import os
import sys
import tracemalloc
import xml.etree.ElementTree as ET
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounding.formats import export_coco, export_labelstudio, export_yolo
from grounding.formats.yolo import is_val
from grounding.io.images import load_image

CLASSES = ["cat", "dog"]
RED, BLUE = (255, 0, 0), (0, 0, 255)
ROT_BOX = [5.0, 10.0, 30.0, 40.0]  # displayed frame of rot.jpg (40x60 displayed)


def det(class_id, bbox, score=None, label=None):
    label = label or (CLASSES[class_id] if class_id is not None else "thing")
    return {"label": label, "class_id": class_id, "bbox": [float(v) for v in bbox],
            "score": score, "attributes": {}, "model_bbox": None}


def pt(class_id, xy, score=None):
    return {"label": CLASSES[class_id], "class_id": class_id, "point": list(xy), "score": score,
            "attributes": {}, "model_point": None}


def rec(image, w, h, dets=(), points=(), error=None):
    return {"image": image, "width": w, "height": h, "model": "test/model", "dialect": "x",
            "input_size": None, "detections": list(dets), "points": list(points), "raw": "",
            "truncated": False, "error": error, "dropped": {}}


def draw(size, box=None, bg=BLUE, fg=RED) -> Image.Image:
    im = Image.new("RGB", size, bg)
    if box is not None:
        x1, y1, x2, y2 = (int(v) for v in box)
        im.paste(fg, (x1, y1, x2, y2))
    return im


def save_rotated_jpeg(path: Path, displayed: Image.Image) -> None:
    """Store the pixels turned so that EXIF orientation 6 shows ``displayed``."""
    stored = displayed.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif)


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    draw((64, 48), [8, 8, 40, 32]).save(root / "a.jpg", quality=95)
    draw((50, 50)).save(root / "sub" / "b.png")
    draw((30, 20)).save(root / "sub" / "deeper" / "c.jpg")
    save_rotated_jpeg(root / "rot.jpg", draw((40, 60), ROT_BOX))
    records = [
        rec("a.jpg", 64, 48, [det(0, [8, 8, 40, 32]), det(1, [30.5, 20.25, 60, 44], 0.9)]),
        rec("sub/b.png", 50, 50, [det(1, [1, 2, 25, 30], 0.3), det(None, [0, 0, 10, 10])],
            [pt(0, (12.5, 20.0))]),
        rec("sub/deeper/c.jpg", 30, 20),
        rec("rot.jpg", 40, 60, [det(0, ROT_BOX)]),
        rec("bad.jpg", None, None, error="model failed"),
        rec("nosize.jpg", None, None, [det(0, [1, 1, 2, 2])]),
        rec("gone.jpg", 10, 10, [det(0, [1, 1, 2, 2])]),
    ]
    return root, records


def test_rotated_fixture_is_what_a_person_sees(dataset):
    root, _ = dataset
    with Image.open(root / "rot.jpg") as raw:
        assert raw.size == (60, 40)
    shown = np.asarray(load_image(root / "rot.jpg"))
    assert shown.shape[:2] == (60, 40)
    assert _is_red(shown, ROT_BOX)


def _is_red(pixels: np.ndarray, box, margin: int = 2) -> bool:
    x1, y1, x2, y2 = (int(v) for v in box)
    inside = pixels[y1 + margin:y2 - margin, x1 + margin:x2 - margin].reshape(-1, 3).astype(int)
    return bool(np.all(inside[:, 0] > 200) and np.all(inside[:, 1:] < 60))


def test_coco_loads_in_pycocotools_and_scores_against_a_hand_made_truth(dataset, tmp_path):
    root, records = dataset
    out = tmp_path / "coco"
    stats = export_coco(iter(records), root, CLASSES, out)
    with redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "annotations.json"))
    assert [c["id"] for c in coco.dataset["categories"]] == [1, 2]
    assert {c["name"] for c in coco.dataset["categories"]} == set(CLASSES)
    assert all(c["supercategory"] == "object" for c in coco.dataset["categories"])
    files = {im["file_name"]: im for im in coco.dataset["images"]}
    assert set(files) == {"a.jpg", "sub/b.png", "sub/deeper/c.jpg", "rot.jpg"}
    assert (files["rot.jpg"]["width"], files["rot.jpg"]["height"]) == (40, 60)
    anns = coco.dataset["annotations"]
    assert len({a["id"] for a in anns}) == len(anns) == stats.boxes == 4
    dog = next(a for a in anns if a["category_id"] == 2 and a["image_id"] == files["a.jpg"]["id"])
    assert dog["bbox"] == pytest.approx([30.5, 20.25, 29.5, 23.75])
    assert dog["area"] == pytest.approx(29.5 * 23.75) and dog["iscrowd"] == 0
    assert dog["score"] == 0.9
    assert all("score" not in a for a in anns if a["category_id"] == 1)

    # Scored by pycocotools against a ground truth written here by hand (its own image and
    # category ids, matched by file name and class name): the export's boxes must be where
    # the objects are. One box is deliberately wrong: the dog of sub/b.png is truly at the
    # far corner, away from the exported [1, 2, 25, 30]. So cat scores 1 and dog has one
    # hit (score 0.9) ranked above one miss (score 0.3): precision 1 up to recall 1/2, then
    # nothing, which is 51 of COCO's 101 recall points: AP 51/101 at every IoU threshold.
    gt_images = {"rot.jpg": (101, 40, 60), "a.jpg": (102, 64, 48), "sub/b.png": (103, 50, 50),
                 "sub/deeper/c.jpg": (104, 30, 20)}
    gt_classes = {"cat": 7, "dog": 3}
    gt_boxes = [("a.jpg", "cat", [8, 8, 32, 24]), ("a.jpg", "dog", [30.5, 20.25, 29.5, 23.75]),
                ("rot.jpg", "cat", [5, 10, 25, 30]),
                ("sub/b.png", "dog", [30, 32, 18, 16])]  # the prediction misses this one
    truth = COCO()
    truth.dataset = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h}
                   for f, (i, w, h) in gt_images.items()],
        "categories": [{"id": i, "name": n} for n, i in gt_classes.items()],
        "annotations": [{"id": k, "image_id": gt_images[f][0], "category_id": gt_classes[c],
                         "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, (f, c, b) in enumerate(gt_boxes, start=1)],
    }
    with redirect_stdout(io.StringIO()):
        truth.createIndex()
    file_of = {im["id"]: im["file_name"] for im in coco.dataset["images"]}
    name_of = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    results = [{"image_id": gt_images[file_of[a["image_id"]]][0],
                "category_id": gt_classes[name_of[a["category_id"]]],
                "bbox": a["bbox"], "score": a.get("score", 1.0)} for a in anns]
    with redirect_stdout(io.StringIO()):
        ev = COCOeval(truth, truth.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    expected = (1.0 + 51 / 101) / 2
    assert ev.stats[0] == pytest.approx(expected)  # AP@[.5:.95]
    assert ev.stats[1] == pytest.approx(expected)  # AP@.5
    assert ev.stats[8] == pytest.approx((1.0 + 0.5) / 2)  # AR@100: one dog of two missed


def _by_name(ds: sv.DetectionDataset, images_dir: Path, flatten: bool) -> dict:
    out = {}
    for path, det_ in ds.annotations.items():
        # supervision resolves COCO paths (copies here) but not YOLO ones (symlinks).
        base = images_dir.resolve() if Path(path).is_relative_to(images_dir.resolve()) \
            else images_dir
        rel = Path(path).relative_to(base).as_posix()
        out[rel.replace("/", "__") if flatten else rel] = det_
    return out


def test_supervision_reads_coco_and_yolo_back_identically(dataset, tmp_path):
    root, records = dataset
    coco_out, yolo_out = tmp_path / "coco", tmp_path / "yolo"
    coco_stats = export_coco(records, root, CLASSES, coco_out, copy=True)
    yolo_stats = export_yolo(records, root, CLASSES, yolo_out, val_fraction=0.5, seed=3)
    assert coco_stats.upright_copies == yolo_stats.upright_copies == 1

    coco_ds = sv.DetectionDataset.from_coco(str(coco_out / "images"),
                                            str(coco_out / "annotations.json"))
    assert coco_ds.classes == CLASSES
    coco_boxes = _by_name(coco_ds, coco_out / "images", flatten=True)
    yolo_boxes = {}
    for split in ("train", "val"):
        ds = sv.DetectionDataset.from_yolo(str(yolo_out / "images" / split),
                                           str(yolo_out / "labels" / split),
                                           str(yolo_out / "data.yaml"))
        assert ds.classes == CLASSES
        yolo_boxes.update(_by_name(ds, yolo_out / "images" / split, flatten=False))
    assert set(coco_boxes) == set(yolo_boxes) == {"a.jpg", "sub__b.png", "sub__deeper__c.jpg",
                                                  "rot.jpg"}
    expected = {r["image"].replace("/", "__"): r for r in records[:4]}
    for name, c in coco_boxes.items():
        y = yolo_boxes[name]
        order_c, order_y = np.lexsort(c.xyxy.T), np.lexsort(y.xyxy.T)
        np.testing.assert_allclose(c.xyxy[order_c], y.xyxy[order_y], atol=1e-3)
        assert c.class_id[order_c].tolist() == y.class_id[order_y].tolist()
        want = np.array([d["bbox"] for d in expected[name]["detections"]
                         if d["class_id"] is not None]).reshape(-1, 4)
        np.testing.assert_allclose(c.xyxy[order_c], want[np.lexsort(want.T)], atol=1e-3)

    # The rotated JPEG: an upright file without the tag, its box over the red patch, for
    # readers that ignore EXIF as much as for those that apply it.
    for path in (coco_out / "images" / "rot.jpg",
                 next((yolo_out / "images").rglob("rot.jpg"))):
        assert not path.is_symlink()
        with Image.open(path) as im:
            assert im.size == (40, 60)
            assert im.getexif().get(0x0112) in (None, 1)
            raw = np.asarray(im.convert("RGB"))
        assert _is_red(raw, ROT_BOX)
        assert _is_red(raw, coco_boxes["rot.jpg"].xyxy[0])
    with Image.open(root / "rot.jpg") as src:  # the source is left alone
        assert src.getexif().get(0x0112) == 6


def save_png_with_late_exif(path: Path, displayed: Image.Image) -> None:
    """Orientation 6 in an eXIf chunk after the pixels, where Pillow finds it only by
    decoding the image."""
    buf = io.BytesIO()
    displayed.transpose(Image.Transpose.ROTATE_90).save(buf, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    data = exif.tobytes()[6:]  # drop the JPEG-style "Exif\0\0" prefix
    chunk = len(data).to_bytes(4, "big") + b"eXIf" + data + \
        zlib.crc32(b"eXIf" + data).to_bytes(4, "big")
    raw = buf.getvalue()
    end = raw.rindex(b"IEND") - 4
    path.write_bytes(raw[:end] + chunk + raw[end:])


def test_png_rotated_by_a_late_exif_chunk_is_written_upright(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    save_png_with_late_exif(root / "late.png", draw((40, 60), ROT_BOX))
    with Image.open(root / "late.png") as im:
        assert "exif" not in im.info  # not seen before decoding
    assert load_image(root / "late.png").size == (40, 60)
    stats = export_yolo([rec("late.png", 40, 60, [det(0, ROT_BOX)])], root, CLASSES,
                        tmp_path / "y", val_fraction=0.0)
    assert stats.upright_copies == 1 and stats.images == 1
    with Image.open(tmp_path / "y" / "images" / "train" / "late.png") as im:
        assert im.format == "PNG" and im.size == (40, 60)
        im.load()
        assert im.getexif().get(0x0112) in (None, 1)
        assert _is_red(np.asarray(im.convert("RGB")), ROT_BOX, margin=0)


def test_images_are_linked_by_default_copied_on_request(dataset, tmp_path):
    root, records = dataset
    linked = tmp_path / "linked"
    export_coco(records, root, CLASSES, linked)
    assert (linked / "images" / "sub" / "b.png").is_symlink()
    assert (linked / "images" / "sub" / "b.png").resolve() == (root / "sub" / "b.png").resolve()
    copied = tmp_path / "copied"
    export_coco(records, root, CLASSES, copied, copy=True)
    target = copied / "images" / "a.jpg"
    assert not target.is_symlink()
    assert target.read_bytes() == (root / "a.jpg").read_bytes()  # never re-encoded


def test_yolo_layout_labels_and_yaml(dataset, tmp_path):
    root, records = dataset
    names = ["cat", 'say "hi": now # not a comment', "null"]
    out = tmp_path / "yolo"
    stats = export_yolo(records, root, names, out, val_fraction=0.0)
    spec = yaml.safe_load((out / "data.yaml").read_text(encoding="utf-8"))
    assert spec["names"] == dict(enumerate(names))
    assert spec["path"] == out.resolve().as_posix()
    assert (spec["train"], spec["val"]) == ("images/train", "images/val")
    labels = out / "labels" / "train"
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == [
        "a.jpg", "rot.jpg", "sub__b.png", "sub__deeper__c.jpg"]
    assert (labels / "sub__deeper__c.txt").read_text() == ""
    rows = (labels / "a.txt").read_text().splitlines()
    assert rows[0] == "0 0.375000 0.416667 0.500000 0.500000"
    assert rows[1].split()[0] == "1" and all(len(v.split(".")[1]) == 6 for v in rows[1].split()[1:])
    assert stats.images == 4 and stats.points_not_supported == 1 and stats.points == 0
    assert list((out / "images" / "val").iterdir()) == []


def test_yolo_split_is_seeded_stable_and_close_to_the_fraction():
    paths = [f"dir{i % 7}/img{i}.jpg" for i in range(4000)]
    split = [is_val(p, 0.2, seed=1) for p in paths]
    assert split == [is_val(p, 0.2, seed=1) for p in paths]
    assert 0.17 < sum(split) / len(split) < 0.23
    assert split != [is_val(p, 0.2, seed=2) for p in paths]
    more = paths + [f"new/img{i}.jpg" for i in range(500)]  # adding images moves none
    assert [is_val(p, 0.2, seed=1) for p in more][:4000] == split


def test_yolo_export_split_repeats(dataset, tmp_path):
    root, records = dataset

    def layout(out: Path) -> set:
        return {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.*")}

    export_yolo(records, root, CLASSES, tmp_path / "y", val_fraction=0.5, seed=7)
    first = layout(tmp_path / "y")
    with pytest.raises(FileExistsError):
        export_yolo(records, root, CLASSES, tmp_path / "y", val_fraction=0.5, seed=7)
    export_yolo(records, root, CLASSES, tmp_path / "y", val_fraction=0.5, seed=7, overwrite=True)
    assert layout(tmp_path / "y") == first


def test_min_score_keeps_unscored_boxes(dataset, tmp_path):
    root, records = dataset
    stats = export_coco(records, root, CLASSES, tmp_path / "c", min_score=0.5)
    anns = json.loads((tmp_path / "c" / "annotations.json").read_text())["annotations"]
    assert sorted(a.get("score") is None for a in anns) == [False, True, True]  # 0.9, None x2
    assert stats.boxes == 3 and stats.boxes_below_min_score == 1
    points = next(i for i in json.loads((tmp_path / "c" / "annotations.json").read_text())[
        "images"] if i["file_name"] == "sub/b.png")["points"]
    assert len(points) == 1  # unscored point kept too
    stats = export_yolo(records, root, CLASSES, tmp_path / "y", min_score=0.95)
    assert stats.boxes == 2 and stats.boxes_below_min_score == 2


def test_skips_are_counted(dataset, tmp_path):
    root, records = dataset
    for export in (export_coco, export_yolo, export_labelstudio):
        stats = export(records, root, CLASSES, tmp_path / export.__name__)
        assert stats.images == 4
        assert stats.boxes_without_class == 1
        assert stats.records_with_error == 1 and stats.records_without_size == 1
        assert stats.images_missing == 1 and stats.images_unusable == 0
        assert len(stats.skipped) == 1 and stats.skipped[0].startswith("gone.jpg: ")


def test_duplicates_and_size_mismatch_are_skipped(dataset, tmp_path):
    root, records = dataset
    bad = [records[0], records[0], rec("sub/b.png", 49, 50, [det(0, [1, 1, 5, 5])])]
    stats = export_coco(bad, root, CLASSES, tmp_path / "c")
    assert stats.images == 1 and stats.images_unusable == 2 and stats.boxes == 2
    assert "twice" in stats.skipped[0] and "50x50" in stats.skipped[1]


def test_unknown_class_id_is_an_error(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(ValueError, match="class list"):
        export_coco([rec("a.jpg", 64, 48, [det(0, [1, 1, 5, 5]),
                                           {**det(0, [1, 1, 5, 5]), "class_id": 5}])],
                    root, CLASSES, tmp_path / "c")


def test_points_in_coco_image_entries(dataset, tmp_path):
    root, records = dataset
    stats = export_coco(records, root, CLASSES, tmp_path / "c")
    images = json.loads((tmp_path / "c" / "annotations.json").read_text())["images"]
    b = next(i for i in images if i["file_name"] == "sub/b.png")
    assert b["points"] == [{"category_id": 1, "point": [12.5, 20.0], "score": None}]
    assert all(i["points"] == [] for i in images if i["file_name"] != "sub/b.png")
    assert stats.points == 1


def test_labelstudio_tasks_match_config(dataset, tmp_path):
    root, records = dataset
    out = tmp_path / "ls"
    stats = export_labelstudio(records, root, ['a "quoted" <class> & co', "dog"], out,
                               url_prefix="/data/local-files/?d=photos/")
    config = ET.fromstring((out / "label_config.xml").read_text(encoding="utf-8"))
    image = config.find("Image")
    rects, keys = config.find("RectangleLabels"), config.find("KeyPointLabels")
    declared = {e.get("name"): {lbl.get("value") for lbl in e.findall("Label")}
                for e in (rects, keys)}
    assert image.get("value") == "$image"
    assert declared["label"] == declared["keypoint"] == {'a "quoted" <class> & co', "dog"}

    tasks = json.loads((out / "tasks.json").read_text(encoding="utf-8"))
    assert len(tasks) == stats.images == 4
    by_url = {t["data"]["image"]: t for t in tasks}
    assert set(by_url) == {"/data/local-files/?d=photos/" + p
                           for p in ("a.jpg", "sub/b.png", "sub/deeper/c.jpg", "rot.jpg")}
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "test/model"
        ids = [r["id"] for r in prediction["result"]]
        assert len(set(ids)) == len(ids)
        for r in prediction["result"]:
            assert r["to_name"] == image.get("name")
            control = rects if r["type"] == "rectanglelabels" else keys
            assert r["from_name"] == control.get("name")
            assert set(r["value"][r["type"]]) <= declared[r["from_name"]]

    a = by_url["/data/local-files/?d=photos/a.jpg"]["predictions"][0]
    assert a["score"] == pytest.approx(0.9)  # mean of the known scores
    dog = next(r for r in a["result"] if r["value"]["rectanglelabels"] == ["dog"])
    assert (dog["original_width"], dog["original_height"], dog["image_rotation"]) == (64, 48, 0)
    assert dog["score"] == 0.9
    assert dog["value"]["x"] == pytest.approx(100 * 30.5 / 64)
    assert dog["value"]["y"] == pytest.approx(100 * 20.25 / 48)
    assert dog["value"]["width"] == pytest.approx(100 * 29.5 / 64)
    assert dog["value"]["height"] == pytest.approx(100 * 23.75 / 48)
    assert dog["value"]["rotation"] == 0

    b = by_url["/data/local-files/?d=photos/sub/b.png"]["predictions"][0]
    (key,) = [r for r in b["result"] if r["type"] == "keypointlabels"]
    assert key["value"]["x"] == pytest.approx(25.0) and key["value"]["y"] == pytest.approx(40.0)
    assert key["value"]["width"] == 0.5 and "score" not in key
    rot = by_url["/data/local-files/?d=photos/rot.jpg"]["predictions"][0]["result"][0]
    assert (rot["original_width"], rot["original_height"]) == (40, 60)
    c = by_url["/data/local-files/?d=photos/sub/deeper/c.jpg"]["predictions"][0]
    assert c == {"model_version": "test/model", "score": None, "result": []}


def test_labelstudio_urls_are_percent_encoded(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    draw((10, 10)).save(root / "a #1?.png")
    export_labelstudio([rec("a #1?.png", 10, 10)], root, CLASSES, tmp_path / "ls")
    (task,) = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert task["data"]["image"] == "/data/local-files/?d=a%20%231%3F.png"


class _PathlibWithoutIntern:
    """``sys`` as pathlib sees it, minus ``sys.intern`` (see the test below)."""

    def __getattr__(self, name):
        return getattr(sys, name)

    @staticmethod
    def intern(text: str) -> str:
        return text


def test_records_stream_from_a_generator_in_constant_memory(tmp_path, monkeypatch):
    """Every exporter takes a generator and holds no more memory for 5,000 records than
    for 500: the tracemalloc peak of a whole export grows far less than the 10x records (a
    list of the records, anything kept per image, or the whole file built in memory at the
    end would make it about 10x). Not more records: tracing every allocation makes the
    exporters about 5x slower (20,000 records take 100 s)."""
    # CPython's pathlib (3.11 at least) interns every part of every path it builds: the
    # process-wide table of interned strings is reallocated now and then as file names
    # come and go, whatever the exporter holds. That table is not the exporter's memory:
    # pathlib interns nothing here (it makes no difference to what pathlib does).
    for module in [m for n, m in sys.modules.items() if n.split(".")[0] == "pathlib"]:
        if getattr(module, "sys", None) is sys:
            monkeypatch.setattr(module, "sys", _PathlibWithoutIntern())
    small, n = 500, 5_000
    root = tmp_path / "src"
    png = io.BytesIO()
    draw((16, 12)).save(png, "PNG")
    for i in range(20):
        (root / f"d{i}").mkdir(parents=True)
    for i in range(n):
        (root / f"d{i % 20}" / f"{i}.png").write_bytes(png.getvalue())

    def records(count):
        for i in range(count):
            yield rec(f"d{i % 20}/{i}.png", 16, 12, [det(i % 2, [1, 2, 9, 10], 0.5)],
                      [pt(0, (3, 4))])

    def peak(export, count, out):
        tracemalloc.start()
        try:
            export(records(count), root, CLASSES, out)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    outs = {export_coco: "c", export_labelstudio: "ls", export_yolo: "y"}
    for export, name in outs.items():
        # first calls fill caches (plugins imported, regexes compiled): not the export's
        export(records(20), root, CLASSES, tmp_path / "warm" / name)
        few = peak(export, small, tmp_path / "few" / name)
        many = peak(export, n, tmp_path / name)
        assert many < 2 * few, (export.__name__, few, many)

    data = json.loads((tmp_path / "c" / "annotations.json").read_text())
    assert len(data["images"]) == len(data["annotations"]) == n
    assert len({a["id"] for a in data["annotations"]}) == n
    assert not list((tmp_path / "c").glob(".coco-*"))  # temp files are gone
    assert len(json.loads((tmp_path / "ls" / "tasks.json").read_text())) == n
    assert sum(len(os.listdir(tmp_path / "y" / "labels" / s)) for s in ("train", "val")) == n
