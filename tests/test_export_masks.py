"""Masks in the exports and in eval (issue 16), checked with the real readers on masks of
known shapes: a rectangle, an L, two blobs."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from grounding.cli.app import app
from grounding.formats import export_coco, export_labelstudio, export_yolo
from grounding.formats.dataset import DatasetError
from grounding.formats.evaluate import evaluate
from grounding.formats.yolo import load_yolo

CLASSES = ["cat", "dog"]
W, H = 64, 48


def rect_mask(x1, y1, x2, y2, w=W, h=H) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def l_mask() -> np.ndarray:
    m = rect_mask(40, 4, 48, 30)
    m[22:30, 40:60] = True
    return m


def blobs_mask() -> np.ndarray:
    return rect_mask(4, 34, 14, 44) | rect_mask(22, 36, 34, 46)


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def bbox_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def det(class_id, mask=None, bbox=None, score=None):
    d = {"label": CLASSES[class_id], "class_id": class_id,
         "bbox": bbox or bbox_of(mask), "score": score, "attributes": {}, "model_bbox": None}
    if mask is not None:
        d["mask"] = rle(mask)
        d["attributes"] = {"mask_score": 0.9, "mask_area": int(mask.sum())}
    return d


def rec(image, dets):
    return {"image": image, "width": W, "height": H, "model": "test/model", "dialect": "x",
            "input_size": None, "detections": list(dets), "points": [], "raw": "",
            "truncated": False, "error": None, "dropped": {}}


MASKS = {"a.png": [(0, rect_mask(8, 8, 30, 24)), (1, l_mask())],
         "b.png": [(0, blobs_mask())]}


def masked_records(shift: int = 0) -> list[dict]:
    return [rec(name, [det(c, np.roll(m, shift, axis=1)) for c, m in dets])
            for name, dets in MASKS.items()]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for name in MASKS:
        Image.new("RGB", (W, H), (0, 0, 255)).save(root / name)
    return root


def quiet(fn, *args):
    with redirect_stdout(io.StringIO()):
        return fn(*args)


def self_ap(path: Path) -> float:
    """COCOeval segm of a COCO file against itself (its annotations as results)."""
    with redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        found = [dict(a, score=1.0) for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(found), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


# --- COCO ----------------------------------------------------------------------------------


def test_coco_rle_is_the_mask_and_evaluates_as_segm(root, tmp_path):
    out = tmp_path / "coco"
    stats = export_coco(masked_records(), root, CLASSES, out)
    assert stats.masks == 3
    coco = quiet(COCO, str(out / "annotations.json"))
    anns = coco.dataset["annotations"]
    expected = [m for dets in MASKS.values() for _, m in dets]
    for a, mask in zip(anns, expected, strict=True):
        assert set(a["segmentation"]) == {"size", "counts"}
        assert isinstance(a["segmentation"]["counts"], str)
        assert a["area"] == int(mask.sum())
        assert a["bbox"] == [*bbox_of(mask)[:2], bbox_of(mask)[2] - bbox_of(mask)[0],
                             bbox_of(mask)[3] - bbox_of(mask)[1]]
        assert (coco.annToMask(a).astype(bool) == mask).all()
    assert self_ap(out / "annotations.json") == pytest.approx(1.0)


def test_coco_polygons_are_every_outer_contour(root, tmp_path):
    out = tmp_path / "coco"
    stats = export_coco(masked_records(), root, CLASSES, out, mask_format="polygon")
    assert stats.masks == 3 and stats.masks_without_polygon == 0
    coco = quiet(COCO, str(out / "annotations.json"))
    anns = coco.dataset["annotations"]
    assert [len(a["segmentation"]) for a in anns] == [1, 1, 2]  # two blobs, two polygons
    expected = [m for dets in MASKS.values() for _, m in dets]
    for a, mask in zip(anns, expected, strict=True):
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        assert a["area"] == int(mask.sum())  # from the mask, not the polygon
        drawn = coco.annToMask(a).astype(bool)
        iou = (drawn & mask).sum() / (drawn | mask).sum()
        assert iou > 0.8  # the outline runs through the boundary pixels' centres
    assert self_ap(out / "annotations.json") == pytest.approx(1.0)


def test_coco_polygon_falls_back_to_rle_for_a_thin_mask(root, tmp_path):
    line = rect_mask(2, 5, 30, 6)  # one pixel thin: a 2-point contour
    out = tmp_path / "coco"
    stats = export_coco([rec("a.png", [det(0, line)])], root, CLASSES, out,
                        mask_format="polygon")
    assert stats.masks_without_polygon == 1
    ann = json.loads((out / "annotations.json").read_text())["annotations"][0]
    assert ann["segmentation"] == rle(line) and ann["area"] == 28


def test_boxes_without_masks_export_as_before(root, tmp_path):
    records = [rec("a.png", [det(0, bbox=[1.0, 2.0, 11.0, 22.0])])]
    for fmt, fn in (("coco", export_coco), ("labelstudio", export_labelstudio)):
        plain = tmp_path / f"{fmt}-plain"
        fn(records, root, CLASSES, plain)
        with_options = tmp_path / f"{fmt}-poly"
        fn(records, root, CLASSES, with_options, mask_format="polygon")
        for name in ("annotations.json", "tasks.json", "label_config.xml"):
            if (plain / name).exists():
                a, b = (plain / name).read_text(), (with_options / name).read_text()
                if name == "annotations.json":  # date_created may tick
                    a, b = (json.loads(t)["annotations"] for t in (a, b))
                assert a == b
    ann = json.loads((tmp_path / "coco-plain" / "annotations.json").read_text())
    assert "segmentation" not in ann["annotations"][0]
    assert ann["annotations"][0]["area"] == 200.0
    assert "Brush" not in (tmp_path / "labelstudio-plain" / "label_config.xml").read_text()


def test_a_mask_of_another_size_is_refused(root, tmp_path):
    bad = rec("a.png", [det(0, rect_mask(1, 1, 5, 5, w=W + 1))])
    with pytest.raises(ValueError, match=r"a\.png.*mask size"):
        export_coco([bad], root, CLASSES, tmp_path / "coco")
    with pytest.raises(ValueError, match="mask_format"):
        export_coco([], root, CLASSES, tmp_path / "c2", mask_format="png")


# --- YOLO ----------------------------------------------------------------------------------


def boundary(mask: np.ndarray) -> np.ndarray:
    """(n, 2) x, y of the mask's pixels that touch a pixel off it (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    ys, xs = np.nonzero(mask & ~inner)
    return np.stack([xs, ys], axis=1).astype(float)


def yolo_rows(out: Path) -> dict[str, list[list[float]]]:
    rows = {}
    for split in ("train", "val"):
        for label in (out / "labels" / split).glob("*.txt"):
            rows[label.stem] = [[float(v) for v in line.split()]
                                for line in label.read_text().splitlines()]
    return rows


@pytest.mark.parametrize("contours", ["largest", "all"])
def test_yolo_segment_rows_trace_the_mask(root, tmp_path, contours):
    records = masked_records()
    records[1]["detections"].append(det(1, bbox=[1.0, 1.0, 9.0, 9.0]))  # no mask
    out = tmp_path / "yolo"
    stats = export_yolo(records, root, CLASSES, out, task="segment", contours=contours)
    assert stats.masks == 3 and stats.boxes_without_mask == 1
    rows = yolo_rows(out)
    assert sorted(rows) == ["a", "b"]
    for stem, name in (("a", "a.png"), ("b", "b.png")):
        assert len(rows[stem]) == len(MASKS[name])  # one row per mask, never per part
        for row, (class_id, mask) in zip(rows[stem], MASKS[name], strict=True):
            assert row[0] == class_id and len(row) % 2 == 1 and len(row) >= 7
            assert all(0.0 <= v <= 1.0 for v in row[1:])
            points = np.array(row[1:]).reshape(-1, 2) * (W, H)
            edge = boundary(mask)
            nearest = np.sqrt(((points[:, None] - edge[None]) ** 2).sum(-1)).min(1)
            assert nearest.max() <= 1.0, (stem, nearest.max())
    blob_points = np.array(rows["b"][0][1:]).reshape(-1, 2) * (W, H)
    left = {bool(x < 18) for x, _ in blob_points}  # left blob x < 14, right x >= 22
    # all: both blobs in one row; largest: the right blob (12x10) alone
    assert left == ({True, False} if contours == "all" else {False})
    spec = yaml.safe_load((out / "data.yaml").read_text())
    assert spec["task"] == "segment" and spec["names"] == {0: "cat", 1: "dog"}
    assert "task=segment" in (out / "data.yaml").read_text()
    back = load_yolo(out)  # grounding's reader takes the polygon rows (as boxes)
    assert not back.warnings and sum(len(im.boxes) for im in back.images) == 3


def test_yolo_detect_is_unchanged_by_masks(root, tmp_path):
    out = tmp_path / "yolo"
    export_yolo(masked_records(), root, CLASSES, out)
    assert all(len(r) == 5 for rows in yolo_rows(out).values() for r in rows)
    assert "task" not in yaml.safe_load((out / "data.yaml").read_text())
    with pytest.raises(ValueError, match="task"):
        export_yolo([], root, CLASSES, tmp_path / "y2", task="pose")


# --- Label Studio --------------------------------------------------------------------------


def decode_brush(data: list[int]) -> np.ndarray:
    """thi.ng rle-pack decode, as Label Studio's front end and label_studio_converter's
    ``decode_rle`` run it."""
    bits = "".join(f"{b:08b}" for b in data)
    pos = 0

    def read(n):
        nonlocal pos
        pos += n
        return int(bits[pos - n:pos], 2)

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        run = read(1)
        j = i + 1 + read(sizes[read(2)])
        if run:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return out


def test_labelstudio_brush_regions_decode_to_the_mask(root, tmp_path):
    out = tmp_path / "ls"
    stats = export_labelstudio(masked_records(), root, CLASSES, out)
    assert stats.masks == 3
    tasks = json.loads((out / "tasks.json").read_text())
    expected = [[m for _, m in dets] for dets in MASKS.values()]
    for task, masks in zip(tasks, expected, strict=True):
        result = task["predictions"][0]["result"]
        brushes = [r for r in result if r["type"] == "brushlabels"]
        assert len(brushes) == len(masks)
        assert len([r for r in result if r["type"] == "rectanglelabels"]) == len(masks)
        for r, mask in zip(brushes, masks, strict=True):
            assert r["from_name"] == "mask" and r["to_name"] == "image"
            assert r["value"]["format"] == "rle"
            assert r["original_width"] == W and r["original_height"] == H
            rgba = decode_brush(r["value"]["rle"]).reshape(H, W, 4)
            assert (rgba[:, :, 3] == mask * 255).all()
    config = ET.fromstring((out / "label_config.xml").read_text())
    brush = config.find("BrushLabels")
    assert brush is not None and brush.get("name") == "mask"
    assert [lab.get("value") for lab in brush] == CLASSES


def test_labelstudio_polygons_in_percent(root, tmp_path):
    out = tmp_path / "ls"
    export_labelstudio(masked_records(), root, CLASSES, out, mask_format="polygon")
    tasks = json.loads((out / "tasks.json").read_text())
    polys = [[r for r in t["predictions"][0]["result"] if r["type"] == "polygonlabels"]
             for t in tasks]
    assert [len(p) for p in polys] == [2, 2]  # rectangle and L; two blobs, two regions
    for r in (r for p in polys for r in p):
        assert r["from_name"] == "polygon" and r["value"]["closed"] is True
        pts = np.array(r["value"]["points"])
        assert pts.shape[1] == 2 and len(pts) >= 3
        assert (pts >= 0).all() and (pts <= 100).all()
    rect = np.array(polys[0][0]["value"]["points"]) / 100 * (W, H)
    assert sorted(map(tuple, rect.round(6).tolist())) == [(8, 8), (8, 23), (29, 8), (29, 23)]
    config = ET.fromstring((out / "label_config.xml").read_text())
    assert config.find("PolygonLabels").get("name") == "polygon"
    assert config.find("BrushLabels") is None


# --- eval --iou-type segm ------------------------------------------------------------------


@pytest.fixture
def truth(root, tmp_path) -> Path:
    out = tmp_path / "truth"
    export_coco(masked_records(), root, CLASSES, out)
    return out / "annotations.json"


def test_segm_eval_of_the_masks_against_themselves_is_perfect(truth):
    report = evaluate(masked_records(), CLASSES, truth, iou_type="segm")
    assert report.iou_type == "segm"
    assert report.map50 == pytest.approx(1.0) and report.map50_95 == pytest.approx(1.0)
    assert report.precision == 1.0 and report.recall == 1.0


def test_segm_eval_drops_for_shifted_masks_while_boxes_alone_do_not_see_it(truth):
    shifted = masked_records(shift=3)
    for r in shifted:  # same boxes, masks moved 3 px right
        for d, (_, m) in zip(r["detections"], MASKS[r["image"]], strict=True):
            d["bbox"] = bbox_of(m)
    segm = evaluate(shifted, CLASSES, truth, iou_type="segm")
    boxes = evaluate(shifted, CLASSES, truth)
    assert boxes.map50_95 == pytest.approx(1.0)
    assert segm.map50_95 < 0.9


def test_segm_eval_against_polygon_truth(root, tmp_path):
    export_coco(masked_records(), root, CLASSES, tmp_path / "poly", mask_format="polygon")
    report = evaluate(masked_records(), CLASSES, tmp_path / "poly" / "annotations.json",
                      iou_type="segm")
    assert report.map50 == pytest.approx(1.0)  # polygons ~1 px inside: IoU > 0.5


def test_segm_eval_refuses_what_it_cannot_score(root, tmp_path, truth):
    plain = [rec(r["image"], [{k: v for k, v in d.items() if k != "mask"}
                              for d in r["detections"]]) for r in masked_records()]
    with pytest.raises(ValueError, match="carry no masks"):
        evaluate(plain, CLASSES, truth, iou_type="segm")
    export_coco(plain, root, CLASSES, tmp_path / "boxes")
    with pytest.raises(DatasetError, match="no annotation has a segmentation"):
        evaluate(masked_records(), CLASSES, tmp_path / "boxes" / "annotations.json",
                 iou_type="segm")
    export_yolo(masked_records(), root, CLASSES, tmp_path / "yolo")
    with pytest.raises(DatasetError, match=r"segm.*needs a COCO json"):
        evaluate(masked_records(), CLASSES, tmp_path / "yolo", iou_type="segm")
    mixed = masked_records()
    mixed[0]["detections"].append(det(0, bbox=[1.0, 1.0, 5.0, 5.0]))
    report = evaluate(mixed, CLASSES, truth, iou_type="segm")
    assert report.predictions_without_mask == 1 and report.map50 == pytest.approx(1.0)


# --- CLI -----------------------------------------------------------------------------------


def make_run(tmp_path: Path, root: Path, records: list[dict]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"images_dir": str(root), "classes": CLASSES}))
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def one_line_error(out, *needles: str) -> None:
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr


def test_cli_export_and_eval_masks(root, tmp_path, truth):
    run = make_run(tmp_path, root, masked_records())
    cli = CliRunner()
    out = cli.invoke(app, ["export", str(run), "--format", "coco", "--mask-format", "polygon",
                           "--out", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    assert self_ap(tmp_path / "c" / "annotations.json") == pytest.approx(1.0)
    out = cli.invoke(app, ["export", str(run), "--format", "yolo", "--yolo-task", "segment",
                           "--contours", "all", "--out", str(tmp_path / "y")])
    assert out.exit_code == 0, out.output
    assert yaml.safe_load((tmp_path / "y" / "data.yaml").read_text())["task"] == "segment"
    out = cli.invoke(app, ["eval", str(run), "--gt", str(truth), "--iou-type", "segm",
                           "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["map50_95"] == pytest.approx(1.0)


@pytest.mark.parametrize("args, needle", [
    (["--format", "coco", "--mask-format", "png"], "--mask-format 'png'"),
    (["--format", "yolo", "--mask-format", "polygon"], "--mask-format is only for"),
    (["--format", "coco", "--yolo-task", "segment"], "--yolo-task is only for"),
    (["--format", "yolo", "--contours", "all"], "--contours is only for --yolo-task"),
    (["--format", "yolo", "--yolo-task", "pose"], "--yolo-task 'pose'"),
])
def test_cli_mask_options_fail_in_one_line(root, tmp_path, args, needle):
    run = make_run(tmp_path, root, masked_records())
    one_line_error(CliRunner().invoke(app, ["export", str(run), *args]), needle)


def test_cli_eval_segm_refusals_are_one_line(root, tmp_path, truth):
    plain = [rec("a.png", [det(0, bbox=[1.0, 1.0, 5.0, 5.0])])]
    run = make_run(tmp_path, root, plain)
    cli = CliRunner()
    one_line_error(cli.invoke(app, ["eval", str(run), "--gt", str(truth), "--iou-type",
                                    "segm"]), "carry no masks")
    one_line_error(cli.invoke(app, ["eval", str(run), "--gt", str(truth), "--iou-type",
                                    "mask"]), "--iou-type 'mask'")
