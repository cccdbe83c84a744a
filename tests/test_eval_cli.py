"""`grounding eval` as a user meets it: every error names its file on one line, what the
ground truth left out is said on stderr, an empty ground truth is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.cli.app import app
from grounding.formats.dataset import DatasetError
from grounding.formats.evaluate import evaluate

IMAGES = {"a.jpg": (100, 80), "b.jpg": (60, 40)}
BOX = [10.0, 10.0, 50.0, 50.0]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"images_dir": str(images), "classes": ["cat"]}))
    lines = [json.dumps({"image": name, "width": w, "height": h, "classes": ["cat"],
                         "detections": [{"label": "cat", "class_id": 0, "bbox": BOX,
                                         "score": None}], "points": []})
             for name, (w, h) in IMAGES.items()]
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return run


def coco(tmp_path: Path, annotations: list, images=None, name="gt.json") -> Path:
    images = images if images is not None else [
        {"id": i, "file_name": n, "width": w, "height": h}
        for i, (n, (w, h)) in enumerate(IMAGES.items(), start=1)]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cat"}]}))
    return path


def ann(i: int, image_id=1, category_id=1, bbox=(10, 10, 40, 40)) -> dict:
    a = {"id": i, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
         "area": 1600, "iscrowd": 0}
    return {k: v for k, v in a.items() if v is not None}


def evaluate_cli(run: Path, gt: Path, *extra: str):
    return CliRunner().invoke(app, ["eval", str(run), "--gt", str(gt), *extra])


def one_line_error(out, *needles: str) -> None:
    assert out.exit_code == 2, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)  # no traceback
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr


def test_unknown_category_ids_are_reported_on_stderr(run, tmp_path):
    annotations = [ann(1), ann(2, image_id=2, bbox=(5, 5, 20, 20)), ann(3, category_id=42),
                   *[ann(10 + k, category_id=99) for k in range(6)]]
    gt = coco(tmp_path, annotations)
    out = evaluate_cli(run, gt)
    assert out.exit_code == 0, out.output
    lines = out.stderr.splitlines()
    assert lines[0] == f"warning: {gt}: 7 ground-truth entries left out as malformed:"
    assert "annotations[2] (id 3): category_id 42 is not in categories" in lines[1]
    assert len(lines) == 1 + 5 + 1 and lines[-1].strip() == "... and 2 more"
    assert "Detection quality" in out.stdout
    as_json = evaluate_cli(run, gt, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["gt_skipped"] == 7
    assert "left out as malformed" in as_json.stderr  # stdout stays JSON


@pytest.mark.parametrize(("annotations", "images", "needle"), [
    ([], [], "has no images"),
    ([], None, "has no annotations"),
    ([ann(1, image_id=None)], None, "no image_id"),
    ([ann(1, category_id=7)], None, "category_id 7 is not in categories"),
])
def test_an_empty_ground_truth_is_a_one_line_error(run, tmp_path, annotations, images, needle):
    gt = coco(tmp_path, annotations, images)
    out = evaluate_cli(run, gt)
    one_line_error(out, str(gt), needle)
    with pytest.raises(DatasetError, match="nothing to evaluate against"):
        evaluate([], ["cat"], gt)


def test_a_yolo_folder_without_boxes_is_an_error(run, tmp_path):
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [cat]\n")
    Image.new("RGB", (100, 80)).save(root / "images" / "a.jpg")
    one_line_error(evaluate_cli(run, root), str(root), "has no annotations")


@pytest.mark.parametrize(("text", "needle"), [
    ("[1, 2]", "this is a JSON list"),
    ("{not json", "not a JSON file"),
    ('{"annotations": []}', 'it has no "images"'),
])
def test_an_unusable_ground_truth_file_is_one_line_naming_it(run, tmp_path, text, needle):
    gt = tmp_path / "truth.json"
    gt.write_text(text)
    one_line_error(evaluate_cli(run, gt), str(gt), needle)


def test_missing_files_and_bad_records_are_named(run, tmp_path):
    gt = coco(tmp_path, [ann(1)])
    one_line_error(evaluate_cli(run, tmp_path / "nope.json"), "nope.json")
    one_line_error(evaluate_cli(tmp_path / "elsewhere", gt), "elsewhere")
    (run / "predictions.jsonl").write_text(json.dumps(
        {"image": "a.jpg", "width": 100, "height": 80,
         "detections": [{"label": "cat", "class_id": 0}]}) + "\n")
    one_line_error(evaluate_cli(run, gt), str(run / "predictions.jsonl"), "a.jpg",
                   "no 'bbox'")
    (run / "run.json").write_text(json.dumps({"classes": ["cat"]}))
    one_line_error(evaluate_cli(run, gt), "run.json has no images_dir")
