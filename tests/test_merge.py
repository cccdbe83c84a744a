"""`grounding merge`: ensembles of runs over the same images (wbf, nms, vote)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.cli import app
from grounding.core.result import Box, Point, Result
from grounding.io.records import read_jsonl
from grounding.pipeline.detector import Detector, Query
from grounding.runs.labeling import label
from grounding.runs.merge import DEFAULT_MERGE_IOU, MergeError, merge_runs
from grounding.runs.rundir import RunDir
from grounding.testing import StaticBackend

runner = CliRunner()
CLASSES = ["cat", "dog"]
W, H = 100, 80


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_images(root: Path, names=("a.png", "b.png")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / name)
    return root


def box(xyxy, cls="cat", score=None, **attributes):
    class_id = CLASSES.index(cls) if cls in CLASSES else None
    return Box(tuple(float(v) for v in xyxy), cls, class_id, score, dict(attributes))


def make_run(path: Path, images: Path, boxes: dict[str, list[Box]], *,
             classes=CLASSES, points: dict[str, list[Point]] | None = None,
             failed: dict[str, str] | None = None, size=(W, H)) -> Path:
    """A run directory as `grounding label` leaves it, with the boxes given per image."""
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({
        "images_dir": str(images.resolve()), "backend": "StaticBackend",
        "model": f"static-{path.name}", "classes": classes, "grounding_version": "test"}))
    with (path / "predictions.jsonl").open("w") as f:
        for image, found in boxes.items():
            result = Result(boxes=found, points=(points or {}).get(image, []), image=image,
                            width=size[0], height=size[1], model=f"static-{path.name}",
                            classes=classes)
            f.write(result.to_json() + "\n")
    with (path / "errors.history.jsonl").open("w") as f:
        for image, error in (failed or {}).items():
            f.write(json.dumps({"image": image, "error": error, "time": "t"}) + "\n")
    return path


def merged(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in read_jsonl(out / "predictions.jsonl")}


def bboxes(record) -> list[list[float]]:
    return [d["bbox"] for d in record["detections"]]


def test_vote_keeps_what_k_runs_found(tmp_path):
    images = make_images(tmp_path / "images", ["a.png"])
    x, y, z = [10, 10, 50, 50], [60, 20, 90, 60], [5, 60, 20, 78]
    runs = [
        make_run(tmp_path / "A", images, {"a.png": [box(x), box(y)]}),
        # B found x (shifted) and z twice: one run, one vote for z.
        make_run(tmp_path / "B", images, {"a.png": [box([12, 10, 52, 50]), box(z),
                                                    box([5, 61, 20, 78])]}),
        make_run(tmp_path / "C", images, {"a.png": [box([8, 12, 48, 50]), box(y)]}),
    ]
    summary = merge_runs(runs, tmp_path / "out", method="vote", min_votes=2)
    record = merged(tmp_path / "out")["a.png"]
    assert bboxes(record) == [[10.0, 32 / 3, 50.0, 50.0], y]  # the mean of the three x's
    votes = [(d["attributes"]["votes"], d["attributes"]["sources"]) for d in record["detections"]]
    assert votes == [(3, [0, 1, 2]), (2, [0, 2])]
    assert record["dropped"] == {"few_votes": 2, "fused": 3}
    assert record["model"] == "merge(vote)" and record["classes"] == CLASSES
    assert all(d["score"] is None and d["class_id"] == 0 for d in record["detections"])
    assert summary["images"] == 1 and summary["objects"] == 2 and summary["errors"] == 0
    assert summary["merge"]["boxes_in"] == 7 and summary["merge"]["boxes_out"] == 2
    config = json.loads((tmp_path / "out" / "run.json").read_text())
    assert config["min_votes"] == 2 and config["method"] == "vote"
    assert [r["path"] for r in config["runs"]] == [str(r.resolve()) for r in runs]
    assert config["runs"][1]["config"]["model"] == "static-B"
    # K=3: only x is left; the default is a majority (2 of 3).
    merge_runs(runs, tmp_path / "k3", method="vote", min_votes=3)
    assert len(merged(tmp_path / "k3")["a.png"]["detections"]) == 1
    assert merge_runs(runs, tmp_path / "k", method="vote")["merge"]["min_votes"] == 2


def test_wbf_averages_matched_boxes_weighted_by_score(tmp_path):
    pytest.importorskip("ensemble_boxes")
    images = make_images(tmp_path / "images", ["a.png"])
    # IoU of the two cat boxes: 30*40 / (50*40) = 0.6 > 0.55: one object.
    a = make_run(tmp_path / "A", images, {"a.png": [box([10, 10, 50, 50], score=0.9),
                                                    box([70, 10, 90, 30], score=0.8)]})
    b = make_run(tmp_path / "B", images, {"a.png": [box([20, 10, 60, 50], score=0.3)]})
    merge_runs([a, b], tmp_path / "out")  # wbf is the default
    record = merged(tmp_path / "out")["a.png"]
    fused, alone = record["detections"]
    # x: (0.9*10 + 0.3*20) / 1.2 = 12.5; score: mean 0.6 times 2 of 2 runs.
    assert fused["bbox"] == pytest.approx([12.5, 10, 52.5, 50], abs=0.01)
    assert fused["score"] == pytest.approx(0.6, abs=1e-6)
    assert fused["attributes"] == {"votes": 2, "sources": [0, 1]}
    # Found by one run of two: the score is halved, the box kept as it was.
    assert alone["bbox"] == pytest.approx([70, 10, 90, 30], abs=0.01)
    assert alone["score"] == pytest.approx(0.4, abs=1e-6)
    assert alone["attributes"] == {"votes": 1, "sources": [0]}
    assert record["model"] == "merge(wbf)" and record["dropped"] == {"fused": 1}


def test_wbf_unscored_boxes_average_plainly_and_stay_unscored(tmp_path):
    pytest.importorskip("ensemble_boxes")
    images = make_images(tmp_path / "images", ["a.png"])
    a = make_run(tmp_path / "A", images, {"a.png": [box([10, 10, 50, 50])]})
    b = make_run(tmp_path / "B", images, {"a.png": [box([20, 10, 60, 50])]})
    merge_runs([a, b], tmp_path / "out", method="wbf")
    (fused,) = merged(tmp_path / "out")["a.png"]["detections"]
    assert fused["bbox"] == pytest.approx([15, 10, 55, 50], abs=0.01)
    assert fused["score"] is None and fused["attributes"]["votes"] == 2


def test_nms_keeps_the_best_ranked_box_as_it_was(tmp_path):
    images = make_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    a = make_run(tmp_path / "A", images, {
        "a.png": [box([10, 10, 50, 50], score=0.6, note="a")],
        "b.png": [box([10, 10, 50, 50])],
        "c.png": [box([10, 10, 50, 50])]})
    b = make_run(tmp_path / "B", images, {
        "a.png": [box([12, 10, 52, 50], score=0.9, note="b")],
        "b.png": [box([12, 10, 52, 50])],
        "c.png": [box([12, 10, 52, 50], score=0.2)]})
    merge_runs([a, b], tmp_path / "out", method="nms")
    records = merged(tmp_path / "out")
    (best,) = records["a.png"]["detections"]
    assert best["bbox"] == [12, 10, 52, 50] and best["score"] == 0.9
    assert best["attributes"] == {"note": "b", "votes": 2, "sources": [0, 1]}
    assert records["a.png"]["dropped"] == {"suppressed": 1}
    assert bboxes(records["b.png"]) == [[10, 10, 50, 50]]  # unscored: the earlier run's
    assert bboxes(records["c.png"]) == [[12, 10, 52, 50]]  # a score beats none


@pytest.mark.parametrize("method", ["wbf", "nms", "vote"])
def test_same_place_other_class_is_another_object(tmp_path, method):
    if method == "wbf":
        pytest.importorskip("ensemble_boxes")
    images = make_images(tmp_path / "images", ["a.png"])
    a = make_run(tmp_path / "A", images, {"a.png": [box([10, 10, 50, 50], "cat")]})
    b = make_run(tmp_path / "B", images, {"a.png": [box([10, 10, 50, 50], "dog"),
                                                    box([10, 10, 50, 50], "cat")]})
    merge_runs([a, b], tmp_path / "out", method=method,
               min_votes=1 if method == "vote" else None)
    found = {(d["label"], d["class_id"], d["attributes"]["votes"])
             for d in merged(tmp_path / "out")["a.png"]["detections"]}
    assert found == {("cat", 0, 2), ("dog", 1, 1)}


def test_without_classes_boxes_group_by_label(tmp_path):
    images = make_images(tmp_path / "images", ["a.png"])
    a = make_run(tmp_path / "A", images, {"a.png": [box([10, 10, 50, 50], "red car")]},
                 classes=None)
    b = make_run(tmp_path / "B", images, {"a.png": [box([11, 10, 50, 50], "red car"),
                                                    box([10, 10, 50, 50], "blue car")]},
                 classes=None)
    merge_runs([a, b], tmp_path / "out", method="nms")
    record = merged(tmp_path / "out")["a.png"]
    assert record["classes"] is None
    assert [(d["label"], d["attributes"]["votes"]) for d in record["detections"]] == [
        ("red car", 2), ("blue car", 1)]


def test_points_of_every_run_are_kept_identical_ones_collapsed(tmp_path):
    images = make_images(tmp_path / "images", ["a.png"])
    p = Point((30.0, 40.0), "cat", 0)
    a = make_run(tmp_path / "A", images, {"a.png": []}, points={"a.png": [p]})
    b = make_run(tmp_path / "B", images, {"a.png": []},
                 points={"a.png": [Point((30.0, 40.0), "cat", 0), Point((31.0, 40.0), "cat", 0)]})
    merge_runs([a, b], tmp_path / "out", method="vote")
    record = merged(tmp_path / "out")["a.png"]
    assert [(q["point"], q["attributes"]["sources"]) for q in record["points"]] == [
        ([30, 40], [0, 1]), ([31, 40], [1])]
    assert record["dropped"] == {"duplicate": 1}


def test_images_not_done_in_every_run_go_to_errors(tmp_path):
    images = make_images(tmp_path / "images", ["a.png", "b.png", "c.png", "d.png", "e.png"])
    a = make_run(tmp_path / "A", images, {"a.png": [box([10, 10, 50, 50])],
                                          "b.png": [box([10, 10, 50, 50])],
                                          "d.png": []},
                 failed={"e.png": "cannot load image e.png: truncated"})
    b = make_run(tmp_path / "B", images, {"a.png": [box([10, 10, 50, 50])],
                                          "c.png": [box([10, 10, 50, 50])]},
                 failed={"b.png": "cannot load image b.png: truncated",
                         "e.png": "cannot load image e.png: truncated"})
    out = tmp_path / "out"
    result = cli("merge", a, b, "--out", out, "--method", "nms")
    assert result.exit_code == 1, result.output
    assert "4 images were not merged" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == 1 and summary["errors"] == 4
    assert list(merged(out)) == ["a.png"]
    errors = {e["image"]: e for e in read_jsonl(out / "errors.jsonl")}
    assert set(errors) == {"b.png", "c.png", "d.png", "e.png"}
    assert errors["e.png"]["missing_in"] == [0, 1]  # failed in every run: still said
    assert errors["b.png"]["missing_in"] == [1]
    assert "failed: cannot load image b.png: truncated" in errors["b.png"]["error"]
    assert str(b) in errors["b.png"]["error"]
    assert errors["c.png"]["missing_in"] == [0] and "not labelled" in errors["c.png"]["error"]
    assert json.loads((out / "summary.json").read_text())["errors"] == 4


def test_an_image_whose_size_differs_between_runs_is_not_merged(tmp_path):
    images = make_images(tmp_path / "images", ["a.png"])
    a = make_run(tmp_path / "A", images, {"a.png": [box([10, 10, 50, 50])]})
    b = make_run(tmp_path / "B", images, {"a.png": [box([10, 10, 50, 50])]}, size=(200, 160))
    summary = merge_runs([a, b], tmp_path / "out", method="nms")
    assert summary["images"] == 0 and summary["errors"] == 1
    (entry,) = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert "run 0 100x80, run 1 200x160" in entry["error"]


def two_runs(tmp_path):
    images = make_images(tmp_path / "images")
    found = {"a.png": [box([10, 10, 50, 50])], "b.png": [box([20, 20, 60, 70], "dog")]}
    return (images, make_run(tmp_path / "A", images, found),
            make_run(tmp_path / "B", images, found))


def refused(*args) -> str:
    result = cli("merge", *args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_refusals_are_one_line_and_exit_2(tmp_path):
    images, a, b = two_runs(tmp_path)
    out = tmp_path / "out"
    assert "at least 2 runs, got 1" in refused(a, "--out", out)
    assert "is one of the input runs" in refused(a, b, "--out", b, "--method", "nms")
    assert "given twice" in refused(a, a, "--out", out, "--method", "nms")
    assert "1 to 2" in refused(a, b, "--out", out, "--method", "vote", "--min-votes", "3")
    assert "1 to 2" in refused(a, b, "--out", out, "--method", "vote", "--min-votes", "0")
    assert "min_votes is for method vote" in refused(a, b, "--out", out, "--min-votes", "1")
    assert "unknown merge method 'mean'" in refused(a, b, "--out", out, "--method", "mean")
    assert "iou" in refused(a, b, "--out", out, "--iou", "0")
    assert f"{tmp_path / 'nothing'} is not a grounding run" in refused(
        a, tmp_path / "nothing", "--out", out)
    other = make_images(tmp_path / "other")
    c = make_run(tmp_path / "C", other, {"a.png": []})
    message = refused(a, c, "--out", out, "--method", "nms")
    assert str(c) in message and "another images folder" in message
    d = make_run(tmp_path / "D", images, {"a.png": []}, classes=["cat"])
    assert "other classes" in refused(a, d, "--out", out, "--method", "nms")
    # A label run (not a merge) is never written into, --force or not.
    assert "holds another run, not a merge" in refused(a, b, "--out", d, "--force")
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(a, b, "--out", tmp_path / "file")
    assert not out.exists()  # nothing was written by any refusal


def test_wbf_without_ensemble_boxes_says_how_to_install(tmp_path, monkeypatch):
    _, a, b = two_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "ensemble_boxes", None)  # import fails
    message = refused(a, b, "--out", tmp_path / "out")
    assert 'pip install "grounding[ensemble]"' in message
    for method in ("nms", "vote"):
        assert cli("merge", a, b, "--out", tmp_path / method, "--method", method).exit_code == 0


def test_rerun_redoes_without_duplicates_and_other_settings_need_force(tmp_path):
    _, a, b = two_runs(tmp_path)
    out = tmp_path / "out"
    first = cli("merge", a, b, "--out", out, "--method", "vote")
    assert first.exit_code == 0, first.output
    before = (out / "predictions.jsonl").read_text()
    assert len(before.splitlines()) == 2
    again = cli("merge", a, b, "--out", out, "--method", "vote")
    assert again.exit_code == 0 and json.loads(again.stdout)["images"] == 2
    assert (out / "predictions.jsonl").read_text() == before
    assert "holds another merge (method: 'vote' -> 'nms'; min_votes: 2 -> None)" in refused(
        a, b, "--out", out, "--method", "nms")
    assert cli("merge", a, b, "--out", out, "--method", "nms", "--force").exit_code == 0
    assert json.loads((out / "run.json").read_text())["method"] == "nms"
    kept = list(out.glob("predictions.*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == before  # the old merge kept, renamed
    assert not list(out.glob("*.tmp"))


def test_export_and_eval_read_a_merged_run(tmp_path):
    _, a, b = two_runs(tmp_path)
    out = tmp_path / "out"
    assert cli("merge", a, b, "--out", out, "--method", "nms").exit_code == 0
    result = cli("export", out, "--format", "coco")
    assert result.exit_code == 0, result.output
    coco = json.loads((out / "export" / "coco" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == CLASSES
    assert sorted(i["file_name"] for i in coco["images"]) == ["a.png", "b.png"]
    assert sorted(x["bbox"] for x in coco["annotations"]) == [[10, 10, 40, 40],
                                                                [20, 20, 40, 50]]
    report = cli("eval", out, "--gt", out / "export" / "coco" / "annotations.json", "--json")
    assert report.exit_code == 0, report.output
    scores = json.loads(report.stdout)
    assert scores["images_matched"] == 2
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0
    assert cli("export", out, "--format", "yolo").exit_code == 0


def test_merge_of_real_label_runs(tmp_path):
    """Runs written by `grounding label` (the static backend, two dialects: boxes a few
    pixels apart) merge into one box per image found by both."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((120 + 10 * i, 160, 3), 90, np.uint8)).save(
            images / f"img{i}.png")
    query = Query.make(["cat", "dog"])
    runs = []
    for name, dialect in [("qwen25", "qwen2.5-vl"), ("qwen2", "qwen2-vl")]:
        label(Detector(StaticBackend(dialect, label="cat")), query, images,
              RunDir(tmp_path / name))
        runs.append(tmp_path / name)
    out = tmp_path / "merged"
    result = cli("merge", *runs, "--out", out, "--method", "vote")
    assert result.exit_code == 0, result.output
    records = merged(out)
    assert len(records) == 3
    for record in records.values():
        (found,) = record["detections"]
        assert found["label"] == "cat" and found["attributes"]["votes"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objects_per_class"] == {"cat": 3, "dog": 0}
    # The merged run is a run: a label run over the folder skips it like any other.
    from grounding.runs.rundir import find_images

    assert sorted(find_images(images)) == ["img0.png", "img1.png", "img2.png"]


def test_default_iou_is_the_documented_one():
    import inspect

    from grounding.cli.merge import merge

    assert inspect.signature(merge).parameters["iou"].default == DEFAULT_MERGE_IOU == 0.55
    with pytest.raises(MergeError, match="at least 2 runs"):
        merge_runs([], "out")
