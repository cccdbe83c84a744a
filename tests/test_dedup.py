"""Duplicate boxes and points: which are removed, which one of a group stays, how they
are counted, and every way to turn it off."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from grounding import Box, Point, Result, dedup, result_from_text
from grounding.cli import app
from grounding.core.dedup import DEFAULT_DEDUP_IOU, keep_boxes, ranking


def boxes(*specs) -> Result:
    """Boxes from (x1, y1, x2, y2, label[, score])."""
    return Result(boxes=[Box(s[:4], s[4], None, s[5] if len(s) > 5 else None) for s in specs],
                  width=1000, height=1000)


def test_near_duplicates_of_one_class_go_and_are_counted():
    r = dedup(boxes((10, 10, 110, 110, "cup"), (12, 11, 111, 112, "cup"),
                    (300, 300, 400, 400, "cup")))
    assert [b.bbox for b in r.boxes] == [(10, 10, 110, 110), (300, 300, 400, 400)]
    assert r.dropped == {"duplicate": 1}


def test_the_first_written_stays_without_scores_and_the_best_scored_with_them():
    first = dedup(boxes((12, 11, 111, 112, "cup"), (10, 10, 110, 110, "cup")))
    assert [b.bbox for b in first.boxes] == [(12, 11, 111, 112)]
    scored = dedup(boxes((12, 11, 111, 112, "cup", 0.4), (10, 10, 110, 110, "cup", 0.9)))
    assert [b.bbox for b in scored.boxes] == [(10, 10, 110, 110)]
    # An unscored box ranks below a scored one, whatever the order.
    mixed = dedup(boxes((12, 11, 111, 112, "cup"), (10, 10, 110, 110, "cup", 0.1)))
    assert [b.score for b in mixed.boxes] == [0.1]


def test_ranking_is_score_then_order():
    assert ranking([None, 0.5, 0.9, None, 0.5]).tolist() == [2, 4, 5, 1, 3]


def test_other_classes_are_not_duplicates_unless_agnostic():
    two = boxes((10, 10, 110, 110, "cup"), (11, 10, 110, 111, "mug"))
    assert len(dedup(two)) == 2
    assert len(dedup(two, agnostic=True)) == 1


def test_classes_compare_by_class_id_not_by_the_words():
    """'cups' and 'cup' matched the same class: one object."""
    r = result_from_text('[{"bbox_2d": [10, 10, 110, 110], "label": "cup"}, '
                         '{"bbox_2d": [11, 10, 111, 110], "label": "cups"}]', "qwen2.5-vl",
                         image_size=(1000, 1000), input_size=(1000, 1000), classes=["cup"])
    assert len(r.boxes) == 1 and r.dropped == {"duplicate": 1}


def test_the_threshold_decides_and_identical_boxes_always_go():
    pair = boxes((0, 0, 100, 100, "a"), (0, 0, 100, 80, "a"))  # IoU 0.8
    assert len(dedup(pair, 0.7)) == 1
    assert len(dedup(pair, 0.85)) == 2
    same = boxes((0, 0, 100, 100, "a"), (0, 0, 100, 100, "a"), (0, 0, 100, 100, "a"))
    only = dedup(same, 1.0)
    assert len(only) == 1 and only.dropped == {"duplicate": 2}
    assert len(dedup(same, None)) == 3  # off: nothing removed
    assert dedup(same, None) is same


def test_points_collapse_only_when_identical():
    r = Result(points=[Point((5, 5), "a"), Point((5, 5), "a"), Point((6, 5), "a"),
                       Point((5, 5), "b")], width=10, height=10)
    out = dedup(r)
    assert [(p.point, p.label) for p in out.points] == [((5, 5), "a"), ((6, 5), "a"),
                                                        ((5, 5), "b")]
    assert out.dropped == {"duplicate": 1}


def test_keep_mask_matches_a_brute_force_greedy_nms():
    """Against a plain greedy NMS written out here, on random boxes and classes."""
    rng = np.random.default_rng(0)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    for _ in range(50):
        n = int(rng.integers(2, 25))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(5, 80, (n, 2))
        xyxy = np.round(np.concatenate([xy, xy + wh], axis=1))
        groups = rng.integers(0, 3, n).tolist()
        scores = [None if rng.random() < 0.3 else float(rng.random()) for _ in range(n)]
        got = keep_boxes(xyxy, groups, scores, 0.5)
        order = np.argsort(-ranking(scores), kind="stable")
        want = np.ones(n, dtype=bool)
        for a in order:
            if want[a]:
                for b in order:
                    if b != a and want[b] and groups[b] == groups[a] and (
                            ranking(scores)[b] < ranking(scores)[a]) and (
                            iou(xyxy[a], xyxy[b]) > 0.5):
                        want[b] = False
        assert got.tolist() == want.tolist()


ANSWER = ('```json\n[\n'
          '  {"bbox_2d": [100, 100, 200, 200], "label": "cup"},\n'
          '  {"bbox_2d": [101, 99, 201, 200], "label": "cup"},\n'
          '  {"bbox_2d": [100, 100, 200, 200], "label": "cup"},\n'
          '  {"bbox_2d": [400, 400, 500, 500], "label": "plate"}\n]\n```')


def test_on_by_default_after_parsing_and_off_on_request():
    r = result_from_text(ANSWER, "qwen2.5-vl", image_size=(1000, 1000),
                         input_size=(1000, 1000))
    assert len(r.boxes) == 2 and r.dropped == {"duplicate": 2}
    assert DEFAULT_DEDUP_IOU == 0.7
    off = result_from_text(ANSWER, "qwen2.5-vl", image_size=(1000, 1000),
                           input_size=(1000, 1000), dedup_iou=None)
    assert len(off.boxes) == 4 and off.dropped == {}


def test_parse_command_dedups_and_says_how_many(tmp_path):
    path = tmp_path / "answer.txt"
    path.write_text(ANSWER, encoding="utf-8")
    runner = CliRunner()
    args = ["parse", str(path), "-d", "qwen2.5-vl", "--input-size", "1000x1000",
            "--image-size", "1000x1000"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert len(record["detections"]) == 2 and record["dropped"] == {"duplicate": 2}
    record = json.loads(runner.invoke(app, [*args, "--no-dedup"]).stdout)
    assert len(record["detections"]) == 4
    record = json.loads(runner.invoke(app, [*args, "--dedup-iou", "1"]).stdout)
    assert len(record["detections"]) == 3  # only the identical one went
    for contradiction in (["--no-dedup", "--dedup-iou", "0.5"],
                          ["--no-dedup", "--dedup-agnostic"]):
        out = runner.invoke(app, [*args, *contradiction])
        assert out.exit_code == 2 and "give one or the other" in " ".join(out.output.split())
    bad = runner.invoke(app, [*args, "--dedup-iou", "1.5"])
    assert bad.exit_code == 2 and "--dedup-iou" in bad.output


@pytest.mark.parametrize("flags, kept, iou", [([], 1, 0.7), (["--no-dedup"], 3, None),
                                              (["--dedup-iou", "0.95"], 2, 0.95)])
def test_label_records_dedup_and_counts_it(tmp_path, flags, kept, iou):
    """Through `grounding label` with a server that writes every box three times."""
    from PIL import Image

    from grounding.testing.loopback import LoopbackServer, grounding_handler

    def thrice(answer: str) -> str:
        line = answer.split("\n")[2]  # the object line of answer_text's JSON list
        return answer.replace(line, ",\n".join([line, line, _nudge(line)]))

    images = tmp_path / "images"
    images.mkdir()
    im = Image.new("RGB", (400, 300), (128, 128, 128))
    im.paste((255, 0, 0), (100, 100, 200, 180))
    im.save(images / "a.png")
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", text=thrice)) as server:
        out = CliRunner().invoke(app, [
            "label", str(images), "--out", str(tmp_path / "run"), "--classes", "red box",
            "--backend", "openai", "--base-url", server.base_url, "--model", "m",
            "--dialect", "qwen2.5-vl", *flags])
    assert out.exit_code == 0, out.output
    record = json.loads((tmp_path / "run" / "predictions.jsonl").read_text())
    assert len(record["detections"]) == kept
    assert record["dropped"].get("duplicate", 0) == 3 - kept
    config = json.loads((tmp_path / "run" / "run.json").read_text())
    assert config["dedup_iou"] == iou and config["dedup_agnostic"] is False


def _nudge(line: str) -> str:
    """The object line with its box 8 pixels wider: IoU about 0.93 with the original
    (a duplicate at 0.7, not at 0.95)."""
    import re

    def wider(m):
        x1, y1, x2, y2 = (int(v) for v in m.group(1).split(","))
        return f'"bbox_2d": [{x1}, {y1}, {x2 + 8}, {y2}]'

    return re.sub(r'"bbox_2d": \[([^\]]+)\]', wider, line)


def test_the_run_summary_counts_what_was_dropped_and_repeating_answers(tmp_path):
    from grounding import Detector, Query, RunDir, label
    from grounding.testing.loopback import LoopbackServer, scene_handler
    from grounding.testing.scenes import scene

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        scene(400, 300, [("red box", (40, 40, 140, 140))], seed=i).image.save(
            images / f"{i}.png")
    handler = scene_handler("qwen2.5-vl", min_size=4, duplicates=2, repeat_until_limit=True)
    with LoopbackServer(handler=handler) as server:
        from grounding.backends.remote import OpenAIBackend

        backend = OpenAIBackend("m", base_url=server.base_url, dialect="qwen2.5-vl",
                                max_new_tokens=300)
        try:
            summary = label(Detector(backend), Query.make(["red box"]), images,
                            RunDir(tmp_path / "run"))
        finally:
            backend.close()
    assert summary["repeating_outputs"] == 2 and summary["truncated_outputs"] == 2
    assert summary["objects"] == 2 and summary["dropped"]["duplicate"] >= 4


def test_the_quick_pre_check_never_hides_a_duplicate():
    """may_have_duplicates (the cheap test run first) is False only when the exact
    comparison keeps every box: random groups, near-threshold pairs, boxes without area,
    identical boxes, small and large groups (both of its paths)."""
    from grounding.core.dedup import may_have_duplicates

    rng = np.random.default_rng(1)
    for trial in range(400):
        n = int(rng.integers(2, 120 if trial % 10 == 0 else 12))
        xy = rng.uniform(0, 300, (n, 2)).round(int(rng.integers(0, 3)))
        wh = rng.uniform(0, 60, (n, 2)).round(1)
        wh[rng.random(n) < 0.05] = 0.0  # some without area
        xyxy = np.concatenate([xy, xy + wh], axis=1)
        if n > 3 and rng.random() < 0.3:
            xyxy[1] = xyxy[0]
        if n > 3 and rng.random() < 0.3:  # a pair near the threshold
            xyxy[2] = xyxy[3] + [0, 0, float(rng.uniform(0, 20)), 0]
        groups = [str(g) for g in rng.integers(0, 3, n)]
        iou = float(rng.choice([0.3, 0.5, 0.7, 0.9, 1.0]))
        boxes = [tuple(map(float, b)) for b in xyxy]
        exact = keep_boxes(xyxy, groups, [None] * n, iou)
        if not may_have_duplicates(boxes, groups, iou):
            assert exact.all(), (boxes, groups, iou)


@pytest.mark.parametrize("size", [(451, 300), (4032, 3024), (300, 451)])
def test_parse_derives_the_frame_detect_used(tmp_path, size):
    """An answer pasted from a detect run lands where detect put it: parse derives the
    model frame from the same pixel budget as the backends."""
    from grounding.backends.remote import OpenAIBackend

    backend = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", dialect="qwen2.5-vl")
    try:
        frame = backend.frame(size)
    finally:
        backend.close()
    path = tmp_path / "a.txt"
    path.write_text('[{"bbox_2d": [0, 0, 28, 28], "label": "x"}]', encoding="utf-8")
    out = CliRunner().invoke(app, ["parse", str(path), "-d", "qwen2.5-vl", "--image-size",
                                   f"{size[0]}x{size[1]}"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["input_size"] == list(frame)
