"""The result type, its JSON record, supervision conversion and class matching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grounding import ClassMap, Result, result_from_text

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
                            "detections", "points", "raw", "truncated", "error", "dropped"]
    assert record["width"] == 1200 and record["height"] == 800
    assert record["input_size"] == [600, 400]
    assert record["dialect"] == "qwen2.5-vl"
    det = record["detections"][0]
    assert det == {"label": "Cats", "class_id": 0, "bbox": [20.0, 40.0, 220.0, 440.0],
                   "score": None, "attributes": {"color": "black"},
                   "model_bbox": [10.0, 20.0, 110.0, 220.0]}
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
    assert det.data["class_name"].tolist() == ["Cats", "dog", "giraffe"]
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
