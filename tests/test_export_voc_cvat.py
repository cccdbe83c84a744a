"""Pascal VOC and CVAT for images 1.1 exports (issue 18), read back by readers that are
not grounding's: supervision's ``from_pascal_voc`` for VOC, and for CVAT a small
``xml.etree`` reader written here from CVAT's format description.

datumaro (whose CVAT importer would be the natural independent reader) is not used: its
install would downgrade Pillow (13 -> 12.3) and pull in pyarrow, pandas and a second
OpenCV wheel, so it is not in the dev extra.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from PIL import Image
from typer.testing import CliRunner

from grounding.cli.app import app
from grounding.formats import export_cvat, export_voc, read_cvat, read_voc
from grounding.formats.voc import voc_box
from grounding.pipeline.detector import Detector, Query
from grounding.runs.labeling import label
from grounding.runs.rundir import RunDir
from grounding.testing import StaticBackend
from grounding.testing.scenes import save_scene, scene

CLASSES = ["cat", "dog"]
# name -> (displayed size, EXIF orientation of the stored file)
IMAGES = {"a.jpg": ((96, 64), 1), "sub/b.png": ((80, 80), 1), "rot6.jpg": ((64, 96), 6),
          "rot8.jpg": ((72, 48), 8)}


def det(class_id, bbox, score=None):
    return {"label": CLASSES[class_id] if class_id is not None else "thing",
            "class_id": class_id, "bbox": [float(v) for v in bbox], "score": score,
            "attributes": {}, "model_bbox": None}


def rec(image, w, h, dets=(), points=()):
    return {"image": image, "width": w, "height": h, "model": "test/model", "dialect": "x",
            "input_size": None, "detections": list(dets), "points": list(points), "raw": "",
            "truncated": False, "error": None, "dropped": {}}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, RunDir]:
    """A real label run (StaticBackend: one "cat" box over the middle half of each image)
    over a folder holding EXIF-rotated JPEGs."""
    base = tmp_path_factory.mktemp("voc_cvat")
    root = base / "photos"
    for i, (name, (size, orientation)) in enumerate(IMAGES.items()):
        save_scene(scene(*size, 2, seed=i), root / name, orientation=orientation)
    run = RunDir(base / "run")
    summary = label(Detector(StaticBackend(label="cat")), Query.make(CLASSES), root, run)
    assert summary["errors"] == 0 and summary["images"] == len(IMAGES)
    return root, run


def by_name(records) -> dict[str, dict]:
    return {r["image"]: r for r in records}


# --- an independent CVAT reader --------------------------------------------------------------


def cvat_by_hand(path: Path) -> tuple[list[str], dict[str, dict]]:
    """CVAT for images 1.1 read with nothing but ElementTree: the labels of <meta>, and per
    image name its size and its boxes (label, xyxy, score attribute or None)."""
    root = ET.parse(path).getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    labels = [label.findtext("name") for label in root.iterfind("meta/task/labels/label")]
    images = {}
    for image in root.iterfind("image"):
        boxes = []
        for box in image.iterfind("box"):
            score = box.find("attribute[@name='score']")
            boxes.append((box.get("label"), [float(box.get(k)) for k in
                                             ("xtl", "ytl", "xbr", "ybr")],
                          None if score is None else float(score.text)))
        images[image.get("name")] = {"width": int(image.get("width")),
                                     "height": int(image.get("height")), "boxes": boxes,
                                     "points": [p.get("points") for p in
                                                image.iterfind("points")]}
    return labels, images


def expected_boxes(record: dict) -> list[tuple[str, list[float], float | None]]:
    return sorted((CLASSES[d["class_id"]], d["bbox"], d.get("score"))
                  for d in record["detections"] if d.get("class_id") is not None)


def assert_upright(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as im:
        assert im.size == size
        assert im.getexif().get(0x0112) in (None, 1)


# --- VOC ---------------------------------------------------------------------------------------


def supervision_voc(out: Path) -> dict[str, tuple[list[str], np.ndarray, tuple[int, int]]]:
    """supervision's reader: per image file name, its class names, boxes (xyxy) and the
    size OpenCV decodes."""
    ds = sv.DetectionDataset.from_pascal_voc(str(out / "JPEGImages"), str(out / "Annotations"))
    found = {}
    for path, image, detections in ds:
        found[Path(path).name] = ([ds.classes[c] for c in detections.class_id],
                                  detections.xyxy, (image.shape[1], image.shape[0]))
    return found


def test_a_label_run_exported_to_voc_reads_back_in_supervision(labelled, tmp_path):
    root, run = labelled
    records = list(run.records())
    stats = export_voc(records, root, CLASSES, tmp_path / "voc")
    assert stats.images == len(IMAGES) and stats.boxes == len(IMAGES)
    assert stats.upright_copies == 2
    found = supervision_voc(tmp_path / "voc")
    assert set(found) == {n.replace("/", "__") for n in IMAGES}
    for record in records:
        name = record["image"].replace("/", "__")
        names, xyxy, size = found[name]
        assert size == (record["width"], record["height"]) == IMAGES[record["image"]][0]
        want = expected_boxes(record)
        assert names == [w[0] for w in want]
        np.testing.assert_allclose(xyxy, [w[1] for w in want], atol=1.0)
        assert_upright(tmp_path / "voc" / "JPEGImages" / name, size)
        xml = ET.parse(tmp_path / "voc" / "Annotations" / (Path(name).stem + ".xml"))
        assert [int(xml.findtext(f"size/{k}")) for k in ("width", "height", "depth")] == \
            [*size, 3]
    ids = (tmp_path / "voc" / "ImageSets" / "Main" / "default.txt").read_text().split()
    assert sorted(ids) == sorted(Path(n.replace("/", "__")).stem for n in IMAGES)
    labelmap = (tmp_path / "voc" / "labelmap.txt").read_text().splitlines()
    assert labelmap[0].startswith("#") and [line.split(":")[0] for line in labelmap[1:]] \
        == CLASSES


@pytest.fixture
def made(tmp_path) -> tuple[Path, list[dict]]:
    """Records by hand: sub-pixel and edge-touching boxes, scores, a point, a box of no
    class, an image with no boxes."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), "blue").save(root / "a.jpg")
    Image.new("RGB", (50, 50), "gray").save(root / "sub" / "b.png")
    Image.new("RGB", (30, 20), "white").save(root / "c.jpg")
    records = [
        rec("a.jpg", 64, 48, [det(0, [8, 8, 40, 32]), det(1, [30.5, 20.25, 64, 48], 0.9)]),
        rec("sub/b.png", 50, 50, [det(1, [0, 0.4, 25.6, 30.49], 0.3), det(None, [0, 0, 9, 9])],
            [{"label": "cat", "class_id": 0, "point": [12.5, 20.0], "score": None,
              "attributes": {}, "model_point": None}]),
        rec("c.jpg", 30, 20),
    ]
    return root, records


def test_voc_boxes_scores_and_read_back(made, tmp_path):
    root, records = made
    out = tmp_path / "voc"
    stats = export_voc(records, root, CLASSES, out, copy=True)
    assert (stats.images, stats.boxes, stats.boxes_without_class,
            stats.points_not_supported) == (3, 3, 1, 1)
    found = supervision_voc(out)
    assert found["c.jpg"][0] == [] and found["c.jpg"][2] == (30, 20)
    back = by_name(read_voc(out))
    assert set(back) == {"a.jpg", "sub__b.png", "c.jpg"}
    for record in records:
        name = record["image"].replace("/", "__")
        want = expected_boxes(record)
        names, xyxy, size = found[name]
        assert names == [w[0] for w in want] and size == (record["width"], record["height"])
        np.testing.assert_allclose(xyxy.reshape(-1, 4), np.reshape([w[1] for w in want],
                                                                   (-1, 4)), atol=0.51)
        mine = back[name]
        assert (mine["width"], mine["height"]) == (record["width"], record["height"])
        got = sorted((d["label"], d["bbox"], d.get("score")) for d in mine["detections"])
        assert [(g[0], g[2]) for g in got] == [(w[0], w[2]) for w in want]
        np.testing.assert_allclose(np.reshape([g[1] for g in got], (-1, 4)),
                                   np.reshape([w[1] for w in want], (-1, 4)), atol=0.51)
    dog = ET.parse(out / "Annotations" / "a.xml").find("object[name='dog']")
    assert [dog.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")] == \
        ["32", "21", "64", "48"]
    assert dog.findtext("attributes/attribute/name") == "score"
    assert float(dog.findtext("attributes/attribute/value")) == 0.9


def test_voc_box_mapping_is_one_based_inclusive_and_clamped():
    assert voc_box([0, 0, 10, 10], 20, 20) == (1, 1, 10, 10)
    assert voc_box([0.5, 1.49, 9.5, 9.51], 20, 20) == (2, 2, 10, 10)
    assert voc_box([-3, -1, 25, 30], 20, 20) == (1, 1, 20, 20)
    assert voc_box([5.2, 5.2, 5.3, 5.3], 20, 20) == (6, 6, 6, 6)  # one pixel, never empty
    assert voc_box([20, 20, 20, 20], 20, 20) == (20, 20, 20, 20)


def test_voc_stem_collisions_are_skipped_and_named(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "x.jpg")
    Image.new("RGB", (8, 8)).save(root / "x.png")
    stats = export_voc([rec("x.jpg", 8, 8), rec("x.png", 8, 8)], root, CLASSES,
                       tmp_path / "voc")
    assert stats.images == 1 and stats.images_unusable == 1
    assert stats.skipped[0].startswith("x.png: ") and "x.xml" in stats.skipped[0]


def test_voc_refuses_a_class_name_its_labelmap_cannot_hold(made, tmp_path):
    root, records = made
    with pytest.raises(ValueError, match="labelmap"):
        export_voc(records, root, ["cat: big", "dog"], tmp_path / "voc")


# --- CVAT --------------------------------------------------------------------------------------


def test_a_label_run_exported_to_cvat_reads_back_by_hand(labelled, tmp_path):
    root, run = labelled
    records = list(run.records())
    stats = export_cvat(records, root, CLASSES, tmp_path / "cvat")
    assert stats.images == len(IMAGES) and stats.upright_copies == 2
    labels, images = cvat_by_hand(tmp_path / "cvat" / "annotations.xml")
    assert labels == CLASSES
    assert set(images) == set(IMAGES)
    for record in records:
        image = images[record["image"]]
        size = (image["width"], image["height"])
        assert size == (record["width"], record["height"]) == IMAGES[record["image"]][0]
        want = expected_boxes(record)
        got = sorted(image["boxes"])
        assert [(g[0], g[2]) for g in got] == [(w[0], w[2]) for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=0.01)
        assert_upright(tmp_path / "cvat" / "images" / record["image"], size)


def test_cvat_scores_points_and_read_back(made, tmp_path):
    root, records = made
    out = tmp_path / "cvat"
    stats = export_cvat(records, root, CLASSES, out)
    assert (stats.images, stats.boxes, stats.points, stats.boxes_without_class) == (3, 3, 1, 1)
    assert (out / "images" / "sub" / "b.png").is_symlink()
    _, images = cvat_by_hand(out / "annotations.xml")
    assert images["sub/b.png"]["points"] == ["12.50,20.00"]
    back = by_name(read_cvat(out))
    for record in records:
        want = expected_boxes(record)
        for got in (sorted(images[record["image"]]["boxes"]),
                    sorted((d["label"], d["bbox"], d.get("score"))
                           for d in back[record["image"]]["detections"])):
            assert [(g[0], g[2]) for g in got] == [(w[0], w[2]) for w in want]
            np.testing.assert_allclose(np.reshape([g[1] for g in got], (-1, 4)),
                                       np.reshape([w[1] for w in want], (-1, 4)), atol=0.01)
        assert (back[record["image"]]["width"], back[record["image"]]["height"]) == \
            (record["width"], record["height"])
    assert back["sub/b.png"]["points"] == [{"label": "cat", "point": [12.5, 20.0],
                                            "attributes": {}}]


CVAT_WRITTEN = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><job><id>7</id><labels><label><name>cat</name><attributes>
    <attribute><name>score</name><input_type>text</input_type></attribute>
  </attributes></label></labels></job><dumped>2025-01-01</dumped></meta>
  <image id="0" name="dir/x.jpg" subset="default" task_id="3" width="640" height="480">
    <tag label="indoor" source="manual"></tag>
    <box label="cat" source="manual" occluded="1" xtl="10.5" ytl="20" xbr="110.25" ybr="220"
         z_order="2" rotation="0.0" group_id="1">
      <attribute name="score">0.75</attribute>
      <attribute name="colour">black</attribute>
    </box>
    <box label="dog" source="semi-auto" occluded="0" xtl="1" ytl="2" xbr="3" ybr="4" z_order="0">
    </box>
    <polygon label="cat" source="manual" occluded="0" points="1,1;5,1;5,5" z_order="0"/>
    <points label="cat" source="manual" occluded="0" points="4.5,6.5" z_order="0"/>
  </image>
  <image id="1" name="y.png" width="10" height="10"></image>
</annotations>
"""


def test_read_cvat_takes_what_cvat_itself_writes(tmp_path):
    path = tmp_path / "annotations.xml"
    path.write_text(CVAT_WRITTEN)
    x, y = read_cvat(path)
    assert (x["image"], x["width"], x["height"]) == ("dir/x.jpg", 640, 480)
    assert x["detections"] == [
        {"label": "cat", "bbox": [10.5, 20.0, 110.25, 220.0], "score": 0.75,
         "attributes": {"colour": "black"}},
        {"label": "dog", "bbox": [1.0, 2.0, 3.0, 4.0], "attributes": {}}]
    assert x["points"] == [{"label": "cat", "point": [4.5, 6.5], "attributes": {}}]
    assert x["ignored"] == {"tag": 1, "polygon": 1}
    assert (y["image"], y["detections"], y["ignored"]) == ("y.png", [], {})


def test_read_cvat_refuses_a_rotated_box_in_one_line(tmp_path):
    path = tmp_path / "annotations.xml"
    path.write_text(CVAT_WRITTEN.replace('rotation="0.0"', 'rotation="15.5"'))
    with pytest.raises(ValueError) as info:
        read_cvat(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "dir/x.jpg" in message
    assert "rotated" in message


def test_read_cvat_refuses_video_and_other_files(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text('<annotations><version>1.1</version><track id="0" label="cat"/>'
                    "</annotations>")
    with pytest.raises(ValueError, match="CVAT for video"):
        read_cvat(path)
    path.write_text("<annotation/>")
    with pytest.raises(ValueError, match="not a CVAT XML file"):
        read_cvat(path)


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_exports_voc_and_cvat_and_refuses_to_overwrite_in_one_line(labelled, tmp_path):
    root, run = labelled
    cli = CliRunner()
    done = cli.invoke(app, ["export", str(run.path), "--format", "voc,cvat", "--copy"])
    assert done.exit_code == 0, done.output
    for fmt, marker in (("voc", "Annotations/a.xml"), ("cvat", "annotations.xml")):
        assert (run.path / "export" / fmt / marker).is_file()
        assert f"{fmt}: " in done.stderr
    voc = by_name(read_voc(run.path / "export" / "voc"))
    cvat = by_name(read_cvat(run.path / "export" / "cvat"))
    for record in run.records():
        assert len(voc[record["image"].replace("/", "__")]["detections"]) == 1
        assert len(cvat[record["image"]]["detections"]) == 1

    mine = tmp_path / "mine"
    first = cli.invoke(app, ["export", str(run.path), "--format", "voc,cvat", "--out",
                             str(mine)])
    assert first.exit_code == 0, first.output
    assert (mine / "voc" / "labelmap.txt").is_file()
    assert (mine / "cvat" / "annotations.xml").is_file()
    for fmt in ("voc", "cvat", "voc,cvat"):
        again = cli.invoke(app, ["export", str(run.path), "--format", fmt, "--out",
                                 str(mine if "," in fmt else mine / fmt)])
        assert again.exit_code == 2, again.output
        assert again.stderr.startswith("error: ") and again.stderr.count("\n") == 1
        assert "pass --overwrite to replace it" in again.stderr
    replaced = cli.invoke(app, ["export", str(run.path), "--format", "cvat", "--out",
                                str(mine / "cvat"), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert all((root / name).exists() for name in IMAGES)  # never the source images
