"""Choosing images for review, importing corrections, exports using them; no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.cli import app
from grounding.runs.corrections import (
    CorrectionsError,
    apply_corrections,
    import_corrections,
    read_corrections,
)
from grounding.runs.review import RANDOM_SHARE, random_count, select_for_review

CLASSES = ["cat", "dog"]


def det(label, bbox, score=None, class_id="auto", **attributes):
    if class_id == "auto":
        class_id = CLASSES.index(label) if label in CLASSES else None
    return {"label": label, "class_id": class_id, "bbox": [float(v) for v in bbox],
            "score": score, "attributes": attributes}


def rec(image, dets=(), w=100, h=80, **extra):
    return {"image": image, "width": w, "height": h, "classes": CLASSES,
            "detections": list(dets), "points": [], "truncated": False, "repetition": False,
            "error": None, **extra}


def test_reasons_and_ranking() -> None:
    records = [
        rec("fine.jpg", [det("cat", [0, 0, 10, 10], 0.9)]),
        rec("low.jpg", [det("cat", [0, 0, 10, 10], 0.2), det("dog", [5, 5, 20, 20], 0.8)]),
        rec("verify.jpg", [det("dog", [0, 0, 10, 10], None, verify_score=0.4)]),
        rec("trunc.jpg", [det("cat", [0, 0, 10, 10])], truncated=True),
        rec("rep.jpg", [det("cat", [0, 0, 10, 10])],
            requests=[{"repetition": True, "truncated": False}]),
        rec("odd.jpg", [det("lion", [0, 0, 10, 10])]),
        rec("empty.jpg"),
        rec("broken.jpg", error="model failed"),
        rec("nosize.jpg", w=None, h=None),
    ]
    choices = select_for_review(records, 10, "uncertain")
    ranked = [(c.image, c.reasons, c.priority) for c in choices]
    assert ranked == [
        ("rep.jpg", ["repetition"], 1.0),
        ("trunc.jpg", ["truncated"], 1.0),
        ("low.jpg", ["low_score"], 0.8),
        ("verify.jpg", ["verify_disagrees"], 0.6),
        ("empty.jpg", ["no_objects"], 0.5),
        ("odd.jpg", ["unmatched_label"], 0.5),
    ]
    assert [c.image for c in select_for_review(records, 2)] == ["rep.jpg", "trunc.jpg"]
    # Reasons add up.
    both = rec("both.jpg", [det("lion", [0, 0, 10, 10], 0.1)], truncated=True)
    [c] = select_for_review([both], 1)
    assert c.reasons == ["low_score", "truncated", "unmatched_label"]
    assert c.priority == pytest.approx(0.9 + 1.0 + 0.5)
    # Already reviewed images are left out when asked.
    assert "low.jpg" not in [c.image for c in select_for_review(records, 10,
                                                                  exclude={"low.jpg"})]


def many(n: int) -> list[dict]:
    return [rec(f"{i:03d}.jpg", [det("cat", [0, 0, 10, 10], 0.1 + 0.8 * i / n)])
            for i in range(n)]


def test_mixed_share_and_determinism() -> None:
    records = many(50)
    choices = select_for_review(records, 10, "mixed", seed=3)
    assert random_count(10) == round(10 * RANDOM_SHARE) == 2
    randoms = [c for c in choices if "random" in c.reasons]
    assert len(choices) == 10 and len(randoms) == 2
    ranked = [c.image for c in choices if "random" not in c.reasons]
    assert ranked == sorted(ranked)  # lowest scores first
    assert choices == select_for_review(list(reversed(records)), 10, "mixed", seed=3)
    assert choices != select_for_review(records, 10, "mixed", seed=4)
    assert len({c.image for c in choices}) == 10
    drawn = select_for_review(records, 5, "random", seed=1)
    assert len(drawn) == 5 and all(c.reasons[-1] == "random" for c in drawn)
    assert random_count(1) == 0 and random_count(2) == 1
    with pytest.raises(ValueError, match="strategy"):
        select_for_review(records, 5, "best")


# --- Corrections -----------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"images_dir": str(images), "classes": CLASSES,
                                              "grounding_version": "test"}))
    records = [rec("a.jpg", [det("cat", [10, 10, 50, 50], 0.3)]),
               rec("sub/b.jpg", [det("dog", [0, 0, 20, 20], 0.9)])]
    for r in records:
        Image.new("RGB", (100, 80)).save(images / r["image"])
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def ls_task(image_url, results, *, key=None, cancelled=False, updated="2026-01-01"):
    data = {"image": image_url} | ({"grounding_image": key} if key else {})
    return {"id": 1, "data": data,
            "annotations": [{"id": 1, "was_cancelled": cancelled, "updated_at": updated,
                             "result": results}]}


def ls_rect(x, y, w, h, label, ow=100, oh=80):
    return {"type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": ow, "original_height": oh,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]}}


def test_import_labelstudio(run: Path, tmp_path: Path) -> None:
    tasks = [ls_task("/data/local-files/?d=a.jpg", [ls_rect(20, 25, 40, 50, "dog")],
                     key="a.jpg"),
             # no key: matched by its URL; the latest annotation wins, cancelled ones don't
             {"id": 2, "data": {"image": "/data/local-files/?d=sub/b.jpg"},
              "annotations": [
                  {"id": 5, "was_cancelled": False, "updated_at": "2026-01-01",
                   "result": [ls_rect(0, 0, 10, 10, "cat")]},
                  {"id": 6, "was_cancelled": False, "updated_at": "2026-01-02", "result": []},
                  {"id": 7, "was_cancelled": True, "updated_at": "2026-01-03",
                   "result": [ls_rect(0, 0, 50, 50, "cat")]}]},
             {"id": 3, "data": {"image": "x.jpg"}, "annotations": []}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    report = import_corrections(run, path)
    assert (report.source, report.imported, report.not_reviewed) == ("labelstudio", 2, 1)
    fixes = read_corrections(run)
    assert fixes["a.jpg"]["detections"] == [{"label": "dog", "class_id": 1,
                                             "bbox": [20.0, 20.0, 60.0, 60.0]}]
    assert fixes["sub/b.jpg"]["detections"] == []
    # A later import of an image wins.
    path.write_text(json.dumps([ls_task("a.jpg", [], key="a.jpg")]))
    import_corrections(run, path)
    assert read_corrections(run)["a.jpg"]["detections"] == []
    assert len((run / "corrections.jsonl").read_text().splitlines()) == 3


def test_import_coco_and_unknown_label(run: Path, tmp_path: Path) -> None:
    coco = {"images": [{"id": 1, "file_name": "sub/b.jpg", "width": 100, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7,
                             "bbox": [1, 2, 30, 40], "area": 1200, "iscrowd": 0}],
            "categories": [{"id": 7, "name": "Cat"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    assert import_corrections(run, path).source == "coco"
    assert read_corrections(run)["sub/b.jpg"]["detections"] == [
        {"label": "Cat", "class_id": 0, "bbox": [1.0, 2.0, 31.0, 42.0]}]
    coco["categories"] = [{"id": 7, "name": "lion"}]
    path.write_text(json.dumps(coco))
    with pytest.raises(CorrectionsError, match=r"label 'lion'.*not a class"):
        import_corrections(run, path)
    coco["images"][0]["file_name"] = "elsewhere.jpg"
    coco["categories"] = [{"id": 7, "name": "cat"}]
    path.write_text(json.dumps(coco))
    with pytest.raises(CorrectionsError, match="no reviewed image"):
        import_corrections(run, path)


def test_apply_corrections() -> None:
    records = [rec("a.jpg", [det("cat", [10, 10, 50, 50], 0.3)]), rec("b.jpg")]
    fixes = {"a.jpg": {"image": "a.jpg", "detections": [
        {"label": "dog", "class_id": 1, "bbox": [1, 2, 3, 4]}]}}
    a, b = apply_corrections(records, fixes)
    assert a["reviewed"] is True and b == records[1]
    assert a["detections"] == [{"label": "dog", "class_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0],
                                "score": None, "attributes": {"reviewed": True},
                                "model_bbox": None}]


def invoke(*args: str, env=None):
    return CliRunner().invoke(app, list(args), env=env)


def test_exports_use_corrections(run: Path, tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps([ls_task("a.jpg", [ls_rect(20, 25, 40, 50, "dog")],
                                        key="a.jpg")]))
    out = invoke("import-corrections", str(run), str(path))
    assert out.exit_code == 0, out.output
    assert invoke("export", str(run), "--format", "coco").exit_code == 0
    coco = json.loads((run / "export" / "coco" / "annotations.json").read_text())
    anns = sorted((a["image_id"], a["bbox"], a.get("attributes")) for a in coco["annotations"])
    ids = {im["file_name"]: im["id"] for im in coco["images"]}
    assert anns == sorted([(ids["a.jpg"], [20.0, 20.0, 40.0, 40.0], {"reviewed": True}),
                           (ids["sub/b.jpg"], [0.0, 0.0, 20.0, 20.0], None)])
    assert invoke("export", str(run), "--format", "labelstudio").exit_code == 0
    tasks = {t["data"]["grounding_image"]: t
             for t in json.loads((run / "export" / "labelstudio" / "tasks.json").read_text())}
    assert tasks["a.jpg"]["data"]["grounding_reviewed"] is True
    assert "predictions" not in tasks["a.jpg"]
    [region] = tasks["a.jpg"]["annotations"][0]["result"]
    assert region["value"]["rectanglelabels"] == ["dog"] and "score" not in region
    assert "annotations" not in tasks["sub/b.jpg"]
    # --no-corrections: the model's boxes.
    out = invoke("export", str(run), "--format", "coco", "--no-corrections", "--out",
                 str(tmp_path / "model"))
    assert out.exit_code == 0, out.output
    coco = json.loads((tmp_path / "model" / "annotations.json").read_text())
    assert sorted(a["bbox"] for a in coco["annotations"]) == [[0.0, 0.0, 20.0, 20.0],
                                                              [10.0, 10.0, 40.0, 40.0]]


def test_review_select_writes_folder(run: Path, tmp_path: Path) -> None:
    out = invoke("review", str(run), "--budget", "5")
    assert out.exit_code == 0, out.output
    folder = run / "review"
    selection = [json.loads(line) for line in (folder / "selection.jsonl").read_text().splitlines()]
    assert selection == [{"image": "a.jpg", "reasons": ["low_score"], "priority": 0.7,
                          "strategy": "uncertain"}]
    info = json.loads((folder / "review.json").read_text())
    assert (info["strategy"], info["budget"], info["seed"], info["selected"]) == (
        "uncertain", 5, 0, 1)
    [task] = json.loads((folder / "tasks.json").read_text())
    assert task["data"]["grounding_image"] == "a.jpg" and task["predictions"]
    assert (folder / "label_config.xml").exists()
    out = invoke("review", "select", str(run), "--strategy", "mixed", "--format", "cvat",
                 "--out", str(tmp_path / "cvat"))
    assert out.exit_code == 0, out.output
    assert (tmp_path / "cvat" / "annotations.xml").exists()


def one_line_error(out, *needles: str) -> None:
    assert out.exit_code == 2, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_cli_misuse(run: Path, tmp_path: Path) -> None:
    one_line_error(invoke("review", str(tmp_path / "nope")), "not a grounding run")
    one_line_error(invoke("review", str(run), "--strategy", "best"), "--strategy")
    one_line_error(invoke("review", str(run), "--format", "voc"), "--format")
    # Nothing to doubt: b.jpg is sure of itself once a.jpg is reviewed.
    path = tmp_path / "export.json"
    path.write_text(json.dumps([ls_task("a.jpg", [], key="a.jpg")]))
    assert invoke("import-corrections", str(run), str(path)).exit_code == 0
    one_line_error(invoke("review", str(run)), "nothing selected")
    one_line_error(invoke("import-corrections", str(run), str(tmp_path / "none.json")),
                   "no such file")
    (tmp_path / "bad.txt").write_text("hello")
    one_line_error(invoke("import-corrections", str(run), str(tmp_path / "bad.txt")),
                   "not a Label Studio")
    one_line_error(invoke("review", "push", str(tmp_path)), "no review")
    assert invoke("review", str(run), "--strategy", "random").exit_code == 0
    env = {"LS_KEY": "x" * 40}
    one_line_error(invoke("review", "push", str(run), "--url", "http://127.0.0.1:9",
                          "--api-key-env", "LS_NOT_SET"), "LS_NOT_SET")
    one_line_error(invoke("review", "pull", str(run), "--url", "http://127.0.0.1:9",
                          "--api-key-env", "LS_KEY", env=env), "not pushed")
    pytest.importorskip("label_studio_sdk")
    one_line_error(invoke("review", "push", str(run), "--url", "http://127.0.0.1:9",
                          "--api-key-env", "LS_KEY", env=env), "cannot reach Label Studio")


def test_trial_findings(run: Path, tmp_path: Path) -> None:
    """A review never goes into the run directory itself; a rotated Label Studio
    rectangle is counted; an image not in the run is named by its run key."""
    one_line_error(invoke("review", str(run), "--out", str(run), "--strategy", "random"),
                   "that is the run directory")
    rotated = ls_rect(20, 25, 40, 50, "dog")
    rotated["value"]["rotation"] = 30
    path = tmp_path / "export.json"
    path.write_text(json.dumps([ls_task("/x/a.jpg", [rotated], key="a.jpg"),
                                ls_task("/data/other.jpg", [], key="other.jpg")]))
    report = import_corrections(run, path)
    assert (report.imported, report.rotated) == (1, 1)
    assert report.unmatched == ["other.jpg"]
    x1, y1, x2, y2 = read_corrections(run)["a.jpg"]["detections"][0]["bbox"]
    assert x2 - x1 > 40 and y2 - y1 > 40  # the upright box around the turned one
