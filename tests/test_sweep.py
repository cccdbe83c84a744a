"""Precision/recall/F1 per score threshold (formats.sweep, `grounding eval --sweep`), checked
against a small case computed by hand; `--gt corrections`; Pascal VOC ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from grounding.cli.app import app
from grounding.formats.dataset import DatasetError
from grounding.formats.evaluate import evaluate, load_corrections
from grounding.formats.sweep import shown_points, sweep, table

CLASSES = ["cat", "dog"]
SIZE = (100, 100)
# Two images, five ground-truth boxes: (class, x1, y1, x2, y2).
GT = {
    "a.jpg": [(0, 0, 0, 10, 10), (0, 20, 20, 30, 30), (1, 50, 50, 70, 70)],
    "b.jpg": [(0, 0, 0, 20, 20), (1, 40, 40, 60, 60)],
}
# Six predictions: (class, box, score, verify score).
PREDS = {
    "a.jpg": [(0, [0, 0, 10, 10], 0.9, 0.95),    # P1: the cat at 0,0: TP
              (0, [1, 0, 11, 10], 0.8, 0.2),     # P2: the same cat again (IoU .82): FP
              (1, [50, 50, 70, 70], 0.6, 0.9)],  # P3: the dog: TP
    "b.jpg": [(0, [0, 0, 20, 20], 0.7, 0.6),     # P4: the cat: TP
              (1, [80, 80, 90, 90], 0.5, 0.1),   # P5: nothing there: FP
              (1, [41, 41, 61, 61], 0.3, None)],  # P6: the dog (IoU 361/439 = .82): TP
}
# By hand, box score. Sorted: .9 TP, .8 FP, .7 TP, .6 TP, .5 FP, .3 TP; 5 GT boxes
# (the cat at 20,20 on a.jpg is never found). At threshold t keep the scores >= t:
#   t    TP FP FN  precision  recall  F1 = 2TP / (2TP + FP + FN)
#   .9   1  0  4   1/1 = 1    1/5     2/6  = .3333
#   .8   1  1  4   1/2        1/5     2/7  = .2857
#   .7   2  1  3   2/3        2/5     4/8  = .5
#   .6   3  1  2   3/4        3/5     6/9  = .6667
#   .5   3  2  2   3/5        3/5     6/10 = .6
#   .3   4  2  1   4/6        4/5     8/11 = .7273   <- best F1
# Lowest threshold with precision >= .7: .6 (3/4); >= .8: .9; none is ever below .5.
BOX_CURVE = [  # threshold, TP, FP, FN, precision, recall, F1 (lowest threshold first)
    (0.3, 4, 2, 1, 4 / 6, 0.8, 8 / 11),
    (0.5, 3, 2, 2, 0.6, 0.6, 0.6),
    (0.6, 3, 1, 2, 0.75, 0.6, 6 / 9),
    (0.7, 2, 1, 3, 2 / 3, 0.4, 0.5),
    (0.8, 1, 1, 4, 0.5, 0.2, 2 / 7),
    (0.9, 1, 0, 4, 1.0, 0.2, 2 / 6),
]
# By hand, verify score. P6 was not verified (None): kept at every threshold, a TP.
# Sorted: .95 TP (P1), .9 TP (P3), .6 TP (P4), .2 FP (P2), .1 FP (P5), plus P6 always.
#   .95  2  0  3   1     2/5   4/7  = .5714
#   .9   3  0  2   1     3/5   6/8  = .75
#   .6   4  0  1   1     4/5   8/9  = .8889   <- best F1, and lowest with precision >= .9
#   .2   4  1  1   4/5   4/5   8/10 = .8
#   .1   4  2  1   4/6   4/5   8/11 = .7273
VERIFY_CURVE = [
    (0.1, 4, 2, 1, 4 / 6, 0.8, 8 / 11),
    (0.2, 4, 1, 1, 0.8, 0.8, 0.8),
    (0.6, 4, 0, 1, 1.0, 0.8, 8 / 9),
    (0.9, 3, 0, 2, 1.0, 0.6, 0.75),
    (0.95, 2, 0, 3, 1.0, 0.4, 4 / 7),
]


def curve(s) -> list[tuple]:
    return [(p.threshold, p.tp, p.fp, p.fn, p.precision, p.recall, p.f1) for p in s.points]


def check(s, expected) -> None:
    assert len(s.points) == len(expected)
    for got, want in zip(curve(s), expected, strict=True):
        assert got[1:4] == want[1:4], (got, want)
        assert got[0] == pytest.approx(want[0]) and got[4:] == pytest.approx(want[4:])


def pure_images(verify: bool = False) -> list[tuple[list, list]]:
    return [([(c, (x1, y1, x2, y2), False) for c, x1, y1, x2, y2 in GT[name]],
             [(c, tuple(box), v if verify else s) for c, box, s, v in PREDS[name]])
            for name in GT]


def records(verify: bool = True) -> list[dict]:
    out = []
    for name in GT:
        dets = []
        for c, box, score, v in PREDS[name]:
            det = {"label": CLASSES[c], "class_id": c, "bbox": [float(x) for x in box],
                   "score": score}
            if verify:
                det["attributes"] = {"verify_score": v}
            dets.append(det)
        out.append({"image": name, "width": SIZE[0], "height": SIZE[1], "detections": dets,
                    "points": [], "error": None})
    return out


def write_coco(path: Path) -> Path:
    images, anns = [], []
    for i, name in enumerate(GT, start=1):
        images.append({"id": i, "file_name": name, "width": SIZE[0], "height": SIZE[1]})
        for c, x1, y1, x2, y2 in GT[name]:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    return path


# --- the computation ---------------------------------------------------------------------


def test_box_score_sweep_matches_the_hand_computation():
    s = sweep(pure_images(), target_precision=0.7)
    assert (s.gt, s.predictions, s.unscored) == (5, 6, 0)
    check(s, BOX_CURVE)
    assert s.best_f1.threshold == pytest.approx(0.3) and s.best_f1.f1 == pytest.approx(8 / 11)
    assert s.target.threshold == pytest.approx(0.6) and s.target.precision == 0.75
    assert sweep(pure_images(), target_precision=0.8).target.threshold == pytest.approx(0.9)
    assert sweep(pure_images(), target_precision=1.0).target.threshold == pytest.approx(0.9)
    assert sweep(pure_images()).target is None


def test_verify_score_sweep_keeps_unverified_boxes_at_every_threshold():
    s = sweep(pure_images(verify=True), score="verify_score", target_precision=0.9)
    assert s.unscored == 1 and s.score == "verify_score"
    check(s, VERIFY_CURVE)
    assert s.best_f1.threshold == pytest.approx(0.6) and s.best_f1.f1 == pytest.approx(8 / 9)
    assert s.target.threshold == pytest.approx(0.6)


def test_ties_crowds_and_unreachable_targets():
    truth = [(0, (0, 0, 10, 10), False), (0, (50, 50, 100, 100), True)]  # a crowd region
    preds = [(0, (0, 0, 10, 10), 0.5), (0, (30, 30, 40, 40), 0.5),  # tie: one threshold
             (0, (60, 60, 70, 70), 0.9)]  # inside the crowd region: neither TP nor FP
    s = sweep([(truth, preds)], target_precision=0.9)
    assert [(p.threshold, p.tp, p.fp, p.fn) for p in s.points] == [(0.5, 1, 1, 0),
                                                                  (0.9, 0, 0, 1)]
    assert s.points[1].precision is None and s.points[1].f1 == 0.0
    assert s.gt == 1 and s.target is None and s.best_f1.threshold == 0.5
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sweep([], target_precision=0)
    assert sweep([(truth, [(0, (0, 0, 10, 10), None)])]).points == []  # nothing scored


def test_evaluate_sweeps_both_scores_and_agrees_with_its_own_precision(tmp_path):
    report = evaluate(records(), CLASSES, write_coco(tmp_path / "gt.json"),
                      sweep_scores=True, target_precision=0.7)
    box, verify = report.sweeps
    check(box, BOX_CURVE)
    check(verify, VERIFY_CURVE)
    assert box.target.threshold == pytest.approx(0.6)
    assert verify.target.threshold == pytest.approx(0.2)  # precision 4/5 >= .7
    # The lowest threshold keeps every box: the report's own pooled precision and recall.
    assert report.precision == pytest.approx(box.points[0].precision)
    assert report.recall == pytest.approx(box.points[0].recall)
    json.dumps(report.to_dict())
    unverified = evaluate(records(verify=False), CLASSES, tmp_path / "gt.json",
                          sweep_scores=True)
    assert [s.score for s in unverified.sweeps] == ["score"]  # no verify score: no sweep
    assert evaluate(records(), CLASSES, tmp_path / "gt.json").sweeps == []


def test_table_shows_a_readable_subset_with_the_marked_rows():
    many = [([(0, (i, 0, i + 1, 1), False) for i in range(0, 200, 2)],
             [(0, (i, 0, i + 1, 1), i / 200) for i in range(0, 200, 2)])]
    s = sweep(many, target_precision=1.0)
    shown = shown_points(s)
    assert len(s.points) == 100 and 10 <= len(shown) <= 12
    assert shown[0] is s.points[0] and shown[-1] is s.points[-1]
    assert s.best_f1 in shown and s.target in shown
    console = Console(record=True, width=140)
    console.print(table(sweep(pure_images(), target_precision=0.7)))
    text = console.export_text()
    assert "best F1" in text and "lowest with P >= 0.7" in text and "0.727" in text


# --- ground truth: Pascal VOC through supervision, corrections ----------------------------


def write_voc(root: Path, names=("a.jpg",), images: bool = True) -> Path:
    (root / "Annotations").mkdir(parents=True)
    if images:
        (root / "JPEGImages").mkdir()
    for name in names:
        if images:
            Image.new("RGB", SIZE, "gray").save(root / "JPEGImages" / name)
        objects = "".join(
            f"<object><name>{CLASSES[c]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
            "</bndbox></object>" for c, x1, y1, x2, y2 in GT[name])
        (root / "Annotations" / f"{Path(name).stem}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>{SIZE[0]}</width>"
            f"<height>{SIZE[1]}</height><depth>3</depth></size>{objects}</annotation>")
    return root


def test_voc_ground_truth_folder_scores_like_coco(tmp_path):
    voc = write_voc(tmp_path / "voc", names=tuple(GT))
    report = evaluate(records(), CLASSES, voc, sweep_scores=True)
    assert report.images_matched == 2 and report.gt_skipped == 0
    check(report.sweeps[0], BOX_CURVE)  # 1-based VOC corners read back to the same boxes
    coco = evaluate(records(), CLASSES, write_coco(tmp_path / "gt.json"))
    assert report.map50 == pytest.approx(coco.map50)
    assert report.map50_95 == pytest.approx(coco.map50_95)
    with pytest.raises(DatasetError, match="JPEGImages"):
        evaluate(records(), CLASSES, write_voc(tmp_path / "bare", images=False))


def corrections_lines() -> list[dict]:
    stale = {"image": "a.jpg", "width": 100, "height": 100, "reviewed": True,
             "source": "cvat", "time": "2024-01-01T00:00:00",
             "detections": [{"label": "cat", "class_id": 0, "bbox": [90, 90, 99, 99]}]}
    # The reviewer's final word on a.jpg: its three boxes, the dog given by label only.
    final = {**stale, "time": "2024-01-02T00:00:00", "source": "labelstudio", "detections": [
        {"label": "cat", "class_id": 0, "bbox": [0, 0, 10, 10]},
        {"label": "cat", "class_id": 0, "bbox": [20, 20, 30, 30]},
        {"label": "Dog", "class_id": None, "bbox": [50, 50, 70, 70]},
        {"label": "bird", "class_id": None, "bbox": [1, 1, 2, 2]},
        {"label": "cat", "class_id": 0, "bbox": [5, 5, 1, 1]}]}  # malformed: left out
    return [stale, final]


def test_load_corrections_last_line_wins(tmp_path):
    path = tmp_path / "corrections.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in corrections_lines()) + "\nnot json\n")
    data = load_corrections(path, CLASSES)
    assert [im.path for im in data.images] == ["a.jpg"]
    assert [(b.category_id, b.x1, b.y2) for b in data.images[0].boxes] == [
        (0, 0, 10), (0, 20, 30), (1, 50, 70), (2, 1, 2)]
    assert data.names == {0: "cat", 1: "dog", 2: "bird"}
    assert data.skipped == 2 and any("not JSON" in w for w in data.warnings)


# --- the command -------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"images_dir": str(images), "classes": CLASSES}))
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    return run


def eval_cli(run: Path, gt: Path | str, *extra: str):
    return CliRunner().invoke(app, ["eval", str(run), "--gt", str(gt), *extra])


def one_line_error(out, *needles: str) -> None:
    assert out.exit_code == 2, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr


def test_sweep_prints_the_table_and_draws_the_plot(run, tmp_path):
    gt = write_coco(tmp_path / "gt.json")
    out = eval_cli(run, gt, "--sweep", "--target-precision", "0.7")
    assert out.exit_code == 0, out.output
    plot = run / "eval" / "pr_curve.png"
    assert "box score threshold" in out.stdout and "verify score threshold" in out.stdout
    assert "best F1" in out.stdout and "lowest with P >= 0.7" in out.stdout
    assert f"precision-recall plot: {plot}" in out.stdout
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    plot.unlink()
    as_json = eval_cli(run, gt, "--json", "--target-precision", "0.7")  # implies --sweep
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    box, verify = data["sweeps"]
    assert box["best_f1"]["threshold"] == pytest.approx(0.3)
    assert box["target"]["threshold"] == pytest.approx(0.6)
    assert verify["best_f1"]["threshold"] == pytest.approx(0.6)
    assert [round(p["precision"], 4) for p in box["points"]] == [
        0.6667, 0.6, 0.75, 0.6667, 0.5, 1.0]
    assert data["pr_curve"] == str(plot) and plot.is_file()
    assert "precision-recall plot" in as_json.stderr


def test_gt_corrections_scores_only_the_reviewed_images(run):
    (run / "corrections.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in corrections_lines()))
    out = eval_cli(run, "corrections", "--json", "--sweep")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["images_matched"] == 1 and data["records_unmatched"] == 0
    assert data["gt_classes_not_in_list"] == ["bird"] and data["gt_skipped"] == 1
    # a.jpg: 3 boxes (2 cats, 1 dog); P1 TP, P2 FP (duplicate), P3 TP.
    assert data["precision"] == pytest.approx(2 / 3) and data["recall"] == pytest.approx(2 / 3)
    assert [(p["threshold"], p["tp"], p["fp"], p["fn"]) for p in data["sweeps"][0]["points"]
            ] == [(0.6, 2, 1, 1), (0.8, 1, 1, 2), (0.9, 1, 0, 2)]


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_target_precision_outside_zero_one_is_an_error(run, tmp_path, value):
    one_line_error(eval_cli(run, write_coco(tmp_path / "gt.json"), "--sweep",
                            "--target-precision", value), "--target-precision", "(0, 1]")


def test_sweep_without_scored_boxes_is_an_error(run, tmp_path):
    rows = records(verify=False)
    for r in rows:
        for d in r["detections"]:
            d["score"] = None
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gt = write_coco(tmp_path / "gt.json")
    one_line_error(eval_cli(run, gt, "--sweep"), "--sweep", "score")
    assert not (run / "eval").exists()
    assert eval_cli(run, gt).exit_code == 0  # without --sweep: the usual report


def test_gt_corrections_without_the_file_is_an_error(run):
    one_line_error(eval_cli(run, "corrections"), "corrections.jsonl",
                   "grounding import-corrections")
    (run / "corrections.jsonl").write_text("\n")
    one_line_error(eval_cli(run, "corrections"), "grounding import-corrections")


def test_voc_folder_on_the_command_line(run, tmp_path):
    out = eval_cli(run, write_voc(tmp_path / "voc", names=tuple(GT)), "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["images_matched"] == 2
    one_line_error(eval_cli(run, write_voc(tmp_path / "bare", images=False)), "JPEGImages")
