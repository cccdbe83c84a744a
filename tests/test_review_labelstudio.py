"""The review loop against a real Label Studio: review → push → a reviewer's annotations
through the API → pull → import-corrections → export and eval --gt corrections.

Needs ``label-studio`` (see tests/label_studio_server.py; skipped without it) and
``label-studio-sdk``; the server takes about a minute to start, once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.cli import app

CLASSES = ["cat", "dog"]
W, H = 100, 80
# image -> the model's boxes (class, bbox, score); e is sure of itself and not reviewed.
MODEL = {
    "a.jpg": [("cat", [10, 10, 50, 50], 0.3), ("dog", [60, 10, 90, 40], 0.35)],
    "b.jpg": [("cat", [20, 20, 60, 60], 0.4), ("dog", [5, 5, 15, 15], 0.42)],
    "c.jpg": [("dog", [5, 5, 45, 35], 0.45)],
    "d.jpg": [("cat", [30, 30, 70, 70], 0.2)],
    "e.jpg": [("dog", [10, 10, 40, 40], 0.95)],
}
MOVED = [40, 30, 80, 70]      # a.jpg: the cat box moved here
ADDED = [50, 40, 90, 70]      # c.jpg: a cat the model missed
# What the reviewer leaves: a's cat moved, b's dog deleted, c's cat added, d accepted.
REVIEWED = {
    "a.jpg": [("cat", MOVED), ("dog", [60, 10, 90, 40])],
    "b.jpg": [("cat", [20, 20, 60, 60])],
    "c.jpg": [("dog", [5, 5, 45, 35]), ("cat", ADDED)],
    "d.jpg": [("cat", [30, 30, 70, 70])],
}


def make_run(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"images_dir": str(images), "classes": CLASSES,
                                              "grounding_version": "test"}))
    lines = []
    for name, boxes in MODEL.items():
        Image.new("RGB", (W, H), (0, 0, 255)).save(images / name)
        dets = [{"label": c, "class_id": CLASSES.index(c), "bbox": [float(v) for v in b],
                 "score": s, "attributes": {}} for c, b, s in boxes]
        lines.append(json.dumps({"image": name, "width": W, "height": H, "classes": CLASSES,
                                 "model": "test/model", "detections": dets, "points": [],
                                 "truncated": False, "error": None}))
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return run


def cli(*args: str, env: dict[str, str] | None = None):
    out = CliRunner().invoke(app, list(args), env=env)
    assert out.exit_code == 0, out.output
    return out


def percent(box, label):
    x1, y1, x2, y2 = box
    return {"x": x1 * 100 / W, "y": y1 * 100 / H, "width": (x2 - x1) * 100 / W,
            "height": (y2 - y1) * 100 / H, "rotation": 0, "rectanglelabels": [label]}


def region(rid, box, label):
    return {"id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": percent(box, label)}


def review_as_a_person(client, project_id: int) -> None:
    """What a reviewer does in the editor, through the API: start from the prediction,
    change it, submit."""
    tasks = {t.data["grounding_image"]: t for t in client.tasks.list(project=project_id)}
    assert sorted(tasks) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    for name, task in tasks.items():
        [prediction] = client.predictions.list(task=task.id)
        result = [dict(r) for r in prediction.result]
        assert [r["value"]["rectanglelabels"][0] for r in result] == [
            c for c, _, _ in MODEL[name]]
        if name == "a.jpg":    # move the cat
            result[0] = {**result[0], "value": percent(MOVED, "cat")}
        elif name == "b.jpg":  # delete the dog
            result = result[:1]
        elif name == "c.jpg":  # add a cat
            result.append(region("added", ADDED, "cat"))
        # d.jpg: accepted as is
        for r in result:
            r.pop("score", None)
        client.annotations.create(id=task.id, result=result, was_cancelled=False)


def test_review_round_trip(tmp_path: Path, label_studio_server) -> None:
    import httpx
    from label_studio_sdk import LabelStudio

    run = make_run(tmp_path)
    review = tmp_path / "review"
    env = {"LS_KEY": label_studio_server.token}

    cli("review", str(run), "--out", str(review), "--budget", "4")
    selection = [json.loads(line) for line in (review / "selection.jsonl").read_text().splitlines()]
    assert [s["image"] for s in selection] == ["d.jpg", "a.jpg", "b.jpg", "c.jpg"]
    assert all(s["reasons"] == ["low_score"] for s in selection)

    cli("review", "push", str(review), "--url", label_studio_server.url,
        "--api-key-env", "LS_KEY", "--project", "grounding round trip", env=env)
    pushed = json.loads((review / "push.json").read_text())
    assert pushed["tasks"] == 4

    with httpx.Client(timeout=60) as http:
        client = LabelStudio(base_url=label_studio_server.url,
                             api_key=label_studio_server.token, httpx_client=http)
        review_as_a_person(client, pushed["project_id"])

    cli("review", "pull", str(review), "--api-key-env", "LS_KEY", env=env)
    export_file = review / "labelstudio-export.json"
    assert len(json.loads(export_file.read_text())) == 4
    cli("import-corrections", str(run), str(export_file))

    lines = [json.loads(line) for line in (run / "corrections.jsonl").read_text().splitlines()]
    got = {c["image"]: [(d["label"], d["bbox"]) for d in c["detections"]] for c in lines}
    assert got == {k: [(c, [float(v) for v in b]) for c, b in v] for k, v in REVIEWED.items()}
    assert all(c["reviewed"] and c["source"] == "labelstudio" for c in lines)
    assert all(d["class_id"] == CLASSES.index(d["label"])
               for c in lines for d in c["detections"])

    # The COCO export: reviewed images with the human boxes, e.jpg with the model's.
    cli("export", str(run), "--format", "coco", "--out", str(tmp_path / "coco"))
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    names = {im["id"]: im for im in coco["images"]}
    exported: dict[str, list] = {}
    for a in coco["annotations"]:
        im = names[a["image_id"]]
        x, y, w, h = a["bbox"]
        exported.setdefault(im["file_name"], []).append(
            (CLASSES[a["category_id"] - 1], [x, y, x + w, y + h], a.get("score"),
             a.get("attributes")))
    reviewed = {"reviewed": True}
    expected = {k: [(c, [float(v) for v in b], None, reviewed) for c, b in v]
                for k, v in REVIEWED.items()}
    expected["e.jpg"] = [("dog", [10.0, 10.0, 40.0, 40.0], 0.95, None)]
    assert exported == expected
    assert {im["file_name"] for im in coco["images"] if im.get("attributes") == reviewed} == \
        set(REVIEWED)

    # The model scored on the reviewed images: a's cat missed (moved away), b's dog a false
    # positive, c's added cat a miss, the rest right.
    report = json.loads(cli("eval", str(run), "--gt", "corrections", "--json").stdout)
    assert report["images_matched"] == 4
    per_class = {c["name"]: c for c in report["classes"]}
    assert (per_class["cat"]["gt"], per_class["cat"]["predicted"],
            per_class["cat"]["true_positives"]) == (4, 3, 2)
    assert (per_class["dog"]["gt"], per_class["dog"]["predicted"],
            per_class["dog"]["true_positives"]) == (2, 3, 2)
    assert report["precision"] == pytest.approx(4 / 6)
    assert report["recall"] == pytest.approx(4 / 6)
    # The same numbers as against a hand-written COCO ground truth of those boxes.
    gt = {"images": [{"id": i, "file_name": n, "width": W, "height": H}
                     for i, n in enumerate(REVIEWED, start=1)],
          "annotations": [{"id": 10 * i + j, "image_id": i, "category_id":
                           CLASSES.index(c) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                           "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0}
                          for i, boxes in enumerate(REVIEWED.values(), start=1)
                          for j, (c, b) in enumerate(boxes)],
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    by_hand = json.loads(cli("eval", str(run), "--gt", str(tmp_path / "gt.json"),
                             "--json").stdout)
    for key in ("map50", "map50_95", "precision", "recall"):
        assert report[key] == pytest.approx(by_hand[key]), key


def test_server_errors_are_one_line(tmp_path: Path, label_studio_server) -> None:
    run = make_run(tmp_path)
    cli("review", str(run), "--budget", "2")
    url = label_studio_server.url

    def error(*args: str, env: dict[str, str]) -> str:
        out = CliRunner().invoke(app, list(args), env=env)
        assert out.exit_code == 2, out.output
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
        return out.stderr

    bad = {"LS_KEY": "0" * 40}
    assert "refused the API key (401" in error("review", "push", str(run), "--url", url,
                                               "--api-key-env", "LS_KEY", env=bad)
    good = {"LS_KEY": label_studio_server.token}
    assert "404" in error("review", "pull", str(run), "--url", url, "--project", "987654",
                          "--api-key-env", "LS_KEY", env=good)
    assert "no project titled 'nobody'" in error("review", "pull", str(run), "--url", url,
                                                 "--project", "nobody",
                                                 "--api-key-env", "LS_KEY", env=good)
    assert "at least 3 characters" in error("review", "push", str(run), "--url", url,
                                            "--project", "ab", "--api-key-env", "LS_KEY",
                                            env=good)
