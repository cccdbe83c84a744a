"""The result type, its JSON record, supervision conversion and class matching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grounding import Box, ClassMap, Point, Result, result_from_text
from grounding.core.errors import GroundingError
from grounding.core.result import InvalidResult, score_at_least

TEXT = """```json
[
  {"bbox_2d": [10, 20, 110, 220], "label": "Cats", "color": "black"},
  {"bbox_2d": [200, 50, 300, 150], "label": "dog"},
  {"bbox_2d": [5, 5, 50, 50], "label": "giraffe"},
  {"point_2d": [40, 60], "label": "cat"}
]
```"""


def make():
    return result_from_text(TEXT, "qwen2.5-vl", image_size=(1200, 800), input_size=(600, 400),
                            classes=["cat", "dog"], model="Qwen/Qwen2.5-VL-7B-Instruct",
                            image="photos/a.jpg")


def test_record_schema():
    record = make().to_record()
    assert list(record) == ["image", "width", "height", "model", "dialect", "input_size",
                            "classes", "detections", "points", "raw", "truncated", "repetition",
                            "error", "dropped"]
    assert record["classes"] == ["cat", "dog"]
    assert record["width"] == 1200 and record["height"] == 800
    assert record["input_size"] == [600, 400]
    assert record["dialect"] == "qwen2.5-vl"
    det = record["detections"][0]
    assert det == {"label": "cat", "class_id": 0, "bbox": [20.0, 40.0, 220.0, 440.0],
                   "score": None, "attributes": {"color": "black"},
                   "model_bbox": [10.0, 20.0, 110.0, 220.0], "model_label": "Cats"}
    assert record["points"][0]["point"] == [80.0, 120.0]
    assert record["raw"] == TEXT
    json.dumps(record)  # serialisable as is


def test_record_roundtrip():
    result = make()
    again = Result.from_json(result.to_json())
    assert again == result


def test_unmatched_labels_are_kept_with_null_class():
    result = make()
    assert [b.class_id for b in result.boxes] == [0, 1, None]
    assert result.boxes[2].label == "giraffe"


def test_to_supervision_detections():
    det = make().to_detections()
    assert det.xyxy.shape == (3, 4)
    np.testing.assert_allclose(det.xyxy[1], [400, 100, 600, 300])
    assert det.class_id.tolist() == [0, 1, -1]
    assert det.data["class_name"].tolist() == ["cat", "dog", "giraffe"]
    assert det.confidence is None


def test_detections_without_classes_number_labels():
    result = result_from_text(TEXT, "qwen2.5-vl", image_size=(600, 400), input_size=(600, 400))
    assert result.to_detections().class_id.tolist() == [0, 1, 2]
    empty = Result()
    assert len(empty.to_detections()) == 0


def test_detections_annotate_with_supervision():
    import supervision as sv

    image = np.zeros((800, 1200, 3), dtype=np.uint8)
    det = make().to_detections()
    out = sv.BoxAnnotator().annotate(image.copy(), det)
    out = sv.LabelAnnotator().annotate(out, det, labels=list(det.data["class_name"]))
    assert out.shape == image.shape and out.any()


@pytest.mark.parametrize(
    ("label", "expected"),
    [("person", 0), ("Person", 0), ("PEOPLE", 0), ("persons", 0), ("cars", 1),
     ("buses", 2), ("traffic-light", 3), ("traffic lights", 3), ("perso", 0), ("tree", None),
     (None, None), ("", None)],
)
def test_class_matching_order(label, expected):
    classes = ClassMap(["person", "car", "bus", "traffic light"])
    assert classes.match(label) == expected


def test_ontology_maps_phrasings_to_one_class():
    classes = ClassMap({"a person": "person", "pedestrian": "person", "automobile": "car"})
    assert classes.names == ["person", "car"]
    assert classes.match("pedestrians") == 0
    assert classes.match("Automobile") == 1
    assert classes.match("person") == 0


def test_exact_match_beats_fuzzy():
    classes = ClassMap(["cat", "cart"])
    assert classes.match("cart") == 1
    assert classes.match("cats") == 0


# --- validation, filter, views -------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bbox", [
    (NAN, 0.0, 1.0, 1.0), (0.0, INF, 1.0, 1.0), (0.0, 0.0, -INF, 1.0), (0.0, 0.0, 1.0, NAN),
    (5.0, 0.0, 1.0, 1.0), (0.0, 5.0, 1.0, 1.0), (0.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0, 2.0),
    None, ("a", 0, 1, 1)])
def test_a_bad_box_is_refused_naming_it(bbox):
    with pytest.raises(ValueError, match="box 'cat'") as caught:
        Box(bbox, "cat")
    assert isinstance(caught.value, InvalidResult) and isinstance(caught.value, GroundingError)


@pytest.mark.parametrize("point", [(NAN, 1.0), (1.0, INF), (-INF, 0.0), (1.0,), None])
def test_a_bad_point_is_refused_naming_it(point):
    with pytest.raises(ValueError, match="point 'nose'"):
        Point(point, "nose")


def test_valid_boxes_and_points_are_stored_as_floats():
    box = Box((1, 2, 1, 2), "dot")  # no area is still a box (x_min == x_max)
    assert box.bbox == (1.0, 2.0, 1.0, 2.0) and all(type(v) is float for v in box.bbox)
    assert Box([np.float32(1), 2, 3, 4]).bbox == (1.0, 2.0, 3.0, 4.0)
    assert Point(np.array([3, 4])).point == (3.0, 4.0)


def test_from_record_of_a_bad_record_names_the_image_and_the_entry():
    record = make().to_record()
    record["detections"][1]["bbox"] = [300, 100, 200, 300]  # x_min > x_max
    with pytest.raises(ValueError, match=r"photos/a\.jpg: detections\[1\]: box 'dog'.*reversed"):
        Result.from_record(record)
    record = make().to_record()
    text = json.dumps(record).replace("[80.0, 120.0]", "[NaN, 120.0]")  # json writes NaN
    with pytest.raises(ValueError, match=r"photos/a\.jpg: points\[0\]: point 'cat'.*finite"):
        Result.from_json(text)
    record = make().to_record()
    del record["detections"][2]["bbox"]
    with pytest.raises(ValueError, match=r"detections\[2\]: no 'bbox'"):
        Result.from_record(record)


def test_non_finite_model_coordinates_count_as_invalid():
    text = ('[{"bbox_2d": [NaN, 1, 20, 30], "label": "a"}, {"bbox_2d": [1e999, 1, 20, 30]},'
            ' {"point_2d": [Infinity, 3]}, {"bbox_2d": [1, 2, 3, 4], "label": "ok"}]')
    for size in (None, (100, 100)):
        result = result_from_text(text, "qwen2.5-vl", image_size=size, input_size=(100, 100))
        assert result.labels == ["ok"] and not result.points
        assert result.dropped == {"invalid": 3}


def test_filter_counts_what_it_removes_in_dropped_and_leaves_the_original():
    result = make()  # boxes cat (0, the model wrote "Cats"), dog (1), giraffe (None); a point
    result.dropped = {"no_area": 2}
    kept = result.filter(keep_box=lambda b: b.class_id is not None,
                         keep_point=lambda p: False, reason="no_area")
    assert kept.labels == ["cat", "dog"] and kept.points == []
    assert kept.dropped == {"no_area": 4}  # added to the count already there
    assert len(result.boxes) == 3 and len(result.points) == 1  # a copy: original as it was
    assert result.dropped == {"no_area": 2}
    kept.boxes[0].attributes["x"] = 1
    assert "x" not in result.boxes[0].attributes
    again = kept.filter(keep_box=lambda b: True, reason="unused")
    assert again.dropped == {"no_area": 4} and again == kept  # nothing removed, no entry
    assert kept.filter(reason="nothing").dropped == kept.dropped  # None keeps everything
    with pytest.raises(ValueError, match="reason"):
        kept.filter(keep_box=lambda b: False, reason="")


def test_score_at_least_keeps_unscored_objects():
    result = Result(boxes=[Box((0, 0, 1, 1), "a", score=0.2), Box((0, 0, 1, 1), "b"),
                           Box((0, 0, 1, 1), "c", score=0.5),
                           Box((0, 0, 1, 1), "d", attributes={"verify_score": 0.9})],
                    points=[Point((0, 0), "p", score=0.1), Point((0, 0), "q", score=0.7)])
    scored = score_at_least(0.5)
    low = result.filter(scored, scored, reason="low_score")
    assert low.labels == ["b", "c", "d"] and [p.label for p in low.points] == ["q"]
    assert low.dropped == {"low_score": 2}
    verified = score_at_least(0.5, lambda b: b.attributes.get("verify_score"))
    assert result.filter(verified, reason="unverified").dropped == {}  # a..c have none
    assert result.filter(score_at_least(None), score_at_least(None), reason="x") == result


def test_views_equal_hand_computed_values():
    result = Result(boxes=[Box((20, 10, 60, 50), "a"), Box((0, 0, 200, 100), "all")],
                    points=[Point((50, 25), "p")], width=200, height=100)
    np.testing.assert_array_equal(result.xyxy, [[20, 10, 60, 50], [0, 0, 200, 100]])
    np.testing.assert_array_equal(result.xywh, [[20, 10, 40, 40], [0, 0, 200, 100]])  # COCO
    np.testing.assert_allclose(result.xywhn, [[0.2, 0.3, 0.2, 0.4], [0.5, 0.5, 1, 1]])  # YOLO
    np.testing.assert_allclose(result.xywh_percent, [[10, 10, 20, 40], [0, 0, 100, 100]])
    np.testing.assert_array_equal(result.points_xy, [[50, 25]])
    np.testing.assert_allclose(result.points_percent, [[25, 25]])
    for view in ("xyxy", "xywh", "xywhn", "xywh_percent"):
        assert getattr(result, view).dtype == np.float64
        assert getattr(Result(width=1, height=1), view).shape == (0, 4)
    assert Result(width=1, height=1).points_percent.shape == (0, 2)
    unsized = Result(boxes=[Box((1, 2, 3, 4))])
    np.testing.assert_array_equal(unsized.xywh, [[1, 2, 2, 2]])
    with pytest.raises(ValueError, match="xywhn needs the image size"):
        _ = unsized.xywhn


def test_to_record_from_record_keeps_everything():
    result = Result(
        boxes=[Box((1.5, 2.0, 30.25, 40.0), "cat", 0, 0.75, {"color": "black", "n": [1, 2]},
                   (3.0, 4.0, 60.5, 80.0)),
               Box((0.0, 0.0, 0.0, 0.0), None, None, None, {}, None)],
        points=[Point((5.0, 6.5), "nose", 1, 0.5, {"side": "left"}, (10.0, 13.0), "Nose"),
                Point((0.0, 0.0))],
        image="photos/a b.jpg", width=64, height=48, model="Qwen/Qwen2.5-VL-7B-Instruct",
        dialect="qwen2.5-vl", input_size=(128, 96), raw="```json\n[]\n```", truncated=True,
        error=None, dropped={"no_area": 1, "low_score": 2},
        answers=[{"question": "how many?", "answer": "two"}], classes=["cat", "nose"])
    record = json.loads(result.to_json())
    again = Result.from_record(record)
    assert again == result
    assert again.to_record() == result.to_record() == record
    assert again.input_size == (128, 96) and isinstance(again.input_size, tuple)
    failed = Result(image="x.jpg", error="model failed", dropped={})
    assert Result.from_json(failed.to_json()) == failed


# --- a class list given: unmatched labels are -1; the label is the class ---------------------

NO_MATCH = '[{"bbox_2d": [1, 2, 30, 40], "label": "truck"}, {"bbox_2d": [5, 5, 9, 9], "label": "dog"}]'


def test_unmatched_labels_are_minus_one_even_when_no_label_matched():
    result = result_from_text(NO_MATCH, "qwen2.5-vl", image_size=(100, 100),
                              input_size=(100, 100), classes=["person", "car"])
    assert result.classes == ["person", "car"] and result.uses_classes
    det = result.to_detections()
    assert det.class_id.tolist() == [-1, -1]  # not 0 ("person") and 1 ("car")
    assert det.data["class_name"].tolist() == ["truck", "dog"]
    again = Result.from_json(result.to_json())
    assert again.classes == ["person", "car"]
    assert again.to_detections().class_id.tolist() == [-1, -1]
    # Without a class list the labels are still numbered, so annotators colour them apart.
    free = result_from_text(NO_MATCH, "qwen2.5-vl", image_size=(100, 100),
                            input_size=(100, 100))
    assert free.classes is None and free.to_record()["classes"] is None
    assert free.to_detections().class_id.tolist() == [0, 1]


def test_old_records_without_classes_or_model_label_still_read():
    record = make().to_record()
    del record["classes"]
    for entry in (*record["detections"], *record["points"]):
        del entry["model_label"]
    old = Result.from_record(record)
    assert old.classes is None and old.boxes[0].model_label is None
    assert old.to_detections().class_id.tolist() == [0, 1, -1]  # ids present: a class list
    with pytest.raises(ValueError, match="classes must be a list"):
        Result.from_record({**record, "classes": "cat,dog"})


def test_ontology_label_is_the_class_and_the_model_words_are_kept():
    text = ('[{"bbox_2d": [1, 2, 30, 40], "label": "pedestrian"}, '
            '{"bbox_2d": [5, 5, 9, 9], "label": "Automobiles"}, '
            '{"point_2d": [7, 8], "label": "pedestrian"}, {"bbox_2d": [1, 1, 3, 3], "label": "tree"}]')
    ontology = {"pedestrian": "person", "automobile": "car"}
    result = result_from_text(text, "qwen2.5-vl", image_size=(100, 100), input_size=(100, 100),
                              classes=ontology)
    assert result.labels == ["person", "car", "tree"]
    assert [b.model_label for b in result.boxes] == ["pedestrian", "Automobiles", "tree"]
    assert [(p.label, p.model_label) for p in result.points] == [("person", "pedestrian")]
    assert result.classes == ["person", "car"]
    det = result.to_detections()
    assert det.data["class_name"].tolist() == ["person", "car", "tree"]
    assert det.class_id.tolist() == [0, 1, -1]
    record = json.loads(result.to_json())
    assert [(d["label"], d["model_label"]) for d in record["detections"]] == [
        ("person", "pedestrian"), ("car", "Automobiles"), ("tree", "tree")]


# --- non-finite numbers ------------------------------------------------------------------------


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} written")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("text", [
    '[{"bbox_2d": [10, 20, Infinity, 60], "label": "a"}]',
    '[{"bbox_2d": [10, 20, 1e999, 60], "label": "a"}]',
    '[{"bbox_2d": [10, NaN, 30, 60], "label": "a"}]',
    '[{"bbox_2d": [-Infinity, 20, 30, 60], "label": "a"}]',
    '[{"point_2d": [NaN, 5], "label": "a"}]',
    '[{"point_2d": [5, NaN], "label": "a"}]',
    '[{"point_2d": [1e999, 5], "label": "a"}]',
])
def test_non_finite_coordinates_are_invalid_not_outside(text):
    for size in (None, (100, 100)):
        result = result_from_text(text, "qwen2.5-vl", image_size=size, input_size=(100, 100))
        assert not result.boxes and not result.points
        assert result.dropped == {"invalid": 1}  # never "outside" or "no_area"
        _strict(result.to_json())


def test_non_finite_scores_and_attributes_are_written_as_null():
    text = ('[{"bbox_2d": [1, 2, 30, 40], "label": "a", "depth": Infinity, '
            '"extra": {"z": NaN, "list": [1, -Infinity]}}]')
    result = result_from_text(text, "qwen2.5-vl", image_size=(100, 100), input_size=(100, 100))
    assert result.boxes[0].attributes["depth"] == float("inf")  # kept as read in memory
    result.boxes[0].score = float("nan")
    result.answers.append({"question": "how far?", "answer": float("inf")})
    record = _strict(result.to_json())
    det = record["detections"][0]
    assert det["score"] is None
    assert det["attributes"] == {"depth": None, "extra": {"z": None, "list": [1, None]}}
    assert record["answers"] == [{"question": "how far?", "answer": None}]
    # to_record itself is strict, so every writer of records (label runs) writes JSON
    json.dumps(result.to_record(), allow_nan=False)
    assert Box((0, 0, 1, 1), "x", score=float("inf")).score is None
    assert Point((0, 0), "x", score=np.float32("nan")).score is None
    assert Box((0, 0, 1, 1), "x", score=np.float32(0.5)).score == 0.5
    with pytest.raises(ValueError, match="score 'high' is not a number"):
        Box((0, 0, 1, 1), "x", score="high")
    nan_record = json.loads(result.to_json()) | {"detections": [
        {"label": "a", "bbox": [1, 2, 3, 4], "score": float("nan")}]}
    assert Result.from_record(nan_record).boxes[0].score is None
