"""The parser must not lose objects to the ways real answers go wrong."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grounding import parse
from grounding.parsing import parse_json_objects

Q25 = "qwen2.5-vl"


def boxes(text, dialect=Q25):
    return [(o.label, o.coords) for o in parse(text, dialect).boxes]


@pytest.mark.parametrize("fence", ["```json\n", "```JSON\n", "```\n", "```python\n", "~~~\n", ""])
def test_any_fence_or_none(fence):
    close = fence.strip()[:3] if fence else ""
    text = f'{fence}[{{"bbox_2d": [1, 2, 3, 4], "label": "cat"}}]\n{close}'
    assert boxes(text) == [("cat", (1, 2, 3, 4))]


def test_prose_around_and_several_blocks():
    text = (
        "Here's what I found: the cat's on the left.\n"
        '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n```\n'
        'And also, in a second block:\n```json\n[\n  {"bbox_2d": [5, 6, 7, 8], "label": "dog"}\n]\n```\n'
        "That's all {folks}."
    )
    assert boxes(text) == [("cat", (1, 2, 3, 4)), ("dog", (5, 6, 7, 8))]


def test_json_inline_after_apostrophe_prose():
    assert boxes('Here\'s the box: {"bbox_2d": [1, 2, 3, 4], "label": "it\'s a cat"}') == [
        ("it's a cat", (1, 2, 3, 4))
    ]


def test_single_quotes_trailing_commas_python_literals():
    text = "[{'bbox_2d': [10, 20, 30, 40,], 'label': 'cup', 'occluded': True, 'note': None,},]"
    parsed = parse(text, Q25)
    assert [(o.label, o.coords) for o in parsed.objects] == [("cup", (10, 20, 30, 40))]
    assert parsed.objects[0].attributes == {"occluded": True, "note": None}


def test_json_literals_inside_lenient_parse():
    text = '{"bbox_2d": [1, 2, 3, 4], "label": "a", "visible": true, "x": null,}'
    assert parse(text, Q25).objects[0].attributes == {"visible": True, "x": None}


def test_truncated_keeps_complete_objects_and_flags():
    full = [{"bbox_2d": [i, i + 1, i + 10, i + 11], "label": f"o{i}"} for i in range(5)]
    text = "```json\n" + json.dumps(full, indent=2)
    for cut in range(len(text) - 3, 8, -7):
        parsed = parse(text[:cut], Q25)
        complete = text[:cut].count("}")
        assert parsed.truncated, cut
        assert len(parsed.objects) == complete
        assert [o.label for o in parsed.objects] == [f"o{i}" for i in range(complete)]


def test_truncated_never_invents_a_cut_number():
    # json-repair would return [5, 6, 7, 8] here although the model may be writing 80.
    parsed = parse('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8', Q25)
    assert [o.coords for o in parsed.objects] == [(1, 2, 3, 4)]
    assert parsed.truncated


def test_complete_answer_is_not_flagged_truncated():
    assert not parse('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```', Q25).truncated
    assert not parse("no objects here.", Q25).truncated


def test_stray_braces_do_not_hide_later_objects():
    text = """[
  {"bbox_2d": [1, 1, 2, 2], "label": "a"},
  {
  {"bbox_2d": [3, 3, 4, 4], "label": "b"},
  }
  {"bbox_2d": [5, 5, 6, 6], "label": "c"}}
  {"bbox_2d": [7, 7, 8, 8], "label": "d"}
]"""
    assert [label for label, _ in boxes(text)] == ["a", "b", "c", "d"]


def test_numbers_as_strings_floats_and_reversed_corners():
    text = '[{"bbox_2d": ["10", "20.5", 3.5, 4], "label": "x"}, {"bbox_2d": "[1, 2, 3, 4]", "label": "y"}]'
    assert boxes(text) == [("x", (10, 20.5, 3.5, 4)), ("y", (1, 2, 3, 4))]
    from grounding import result_from_text

    r = result_from_text(text, Q25, image_size=(100, 100), input_size=(100, 100))
    assert r.boxes[0].bbox == (3.5, 4, 10, 20.5)  # corners put in order
    assert r.boxes[0].model_bbox == (10, 20.5, 3.5, 4)  # as written


@pytest.mark.parametrize(
    ("key", "value", "label"),
    [
        ("label", "cat", "cat"),
        ("name", "cat", "cat"),
        ("name_en", "cat", "cat"),
        ("names", {"zh": "猫", "en": "cat"}, "cat"),
        ("text_content", "TOTAL", "TOTAL"),
        ("description", "a cat", "a cat"),
        ("class", "cat", "cat"),
        ("category", "cat", "cat"),
        ("label_fr", "chat", "chat"),
    ],
)
def test_label_keys(key, value, label):
    text = json.dumps([{"bbox_2d": [1, 2, 3, 4], key: value}], ensure_ascii=False)
    assert boxes(text) == [(label, (1, 2, 3, 4))]


def test_extra_keys_are_kept_as_attributes():
    text = '{"bbox_2d": [1, 2, 3, 4], "label": "car", "color": "red", "confidence": 0.9}'
    assert parse(text, Q25).objects[0].attributes == {"color": "red", "confidence": 0.9}


def test_other_coordinate_keys_and_shapes():
    text = """[
 {"bbox": [1, 2, 3, 4], "label": "a"},
 {"box_2d": [[1, 2], [3, 4]], "label": "b"},
 {"bbox_2d": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}, "label": "c"},
 {"point_2d": [5, 6], "label": "d"},
 {"point": ["7", "8"], "label": "e"}
]"""
    parsed = parse(text, Q25)
    assert [(o.kind, o.label, o.coords) for o in parsed.objects] == [
        ("box", "a", (1, 2, 3, 4)),
        ("box", "b", (1, 2, 3, 4)),
        ("box", "c", (1, 2, 3, 4)),
        ("point", "d", (5, 6)),
        ("point", "e", (7, 8)),
    ]


def test_wrapped_in_an_object():
    text = '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}]}'
    assert [label for label, _ in boxes(text)] == ["a", "b"]


def test_unusable_coordinates_are_counted_not_raised():
    parsed = parse('[{"bbox_2d": [1, 2, 3], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "b"}]', Q25)
    assert [o.label for o in parsed.objects] == ["b"]
    assert parsed.invalid == 1


def test_xml_points():
    text = '<points x1="10" y1="20" x2="30.5" y2="40" alt="two mugs">two mugs</points> and <points x1="1" y1="2" alt="pen">pen</points>'
    parsed = parse(text, Q25)
    assert [(o.kind, o.label, o.coords) for o in parsed.objects] == [
        ("point", "two mugs", (10, 20)),
        ("point", "two mugs", (30.5, 40)),
        ("point", "pen", (1, 2)),
    ]
    assert parsed.objects[0].attributes == {"alt": "two mugs"}


def test_qwen3_reads_the_same_json():
    assert boxes('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]', "qwen3-vl") == [("a", (1, 2, 3, 4))]


# --- special-token dialects -------------------------------------------------------------


def test_qwen2_vl_tokens():
    text = (
        "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
        "<|box_start|>(500,600),(700,800)<|box_end|> and "
        "<|object_ref_start|>sign<|object_ref_end|><|quad_start|>(1,2),(9,2),(9,8),(1,8)<|quad_end|>"
    )
    parsed = parse(text, "qwen2-vl")
    assert [(o.label, o.coords) for o in parsed.objects] == [
        ("the red car", (100, 200, 300, 400)),
        ("the red car", (500, 600, 700, 800)),
        ("sign", (1, 2, 9, 8)),
    ]
    assert parsed.objects[2].attributes == {"quad": [1, 2, 9, 2, 9, 8, 1, 8]}
    assert not parsed.truncated


def test_qwen2_vl_with_special_tokens_stripped():
    # What a server returns with skip_special_tokens=True.
    assert boxes("the red car(100,200),(300,400)", "qwen2-vl") == [("the red car", (100, 200, 300, 400))]


def test_qwen2_vl_truncated():
    parsed = parse("<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,", "qwen2-vl")
    assert parsed.truncated and not parsed.objects


def test_qwen_vl_tokens():
    text = "<ref>woman</ref><box>(12,34),(560,780)</box> and <ref>dog</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"
    assert boxes(text, "qwen-vl") == [
        ("woman", (12, 34, 560, 780)),
        ("dog", (1, 2, 3, 4)),
        ("dog", (5, 6, 7, 8)),
    ]


def test_deepseek_vl2_several_boxes_per_ref():
    # The example from supervision's docs for DeepSeek-VL2.
    text = (
        "<|ref|>The giraffe at the back<|/ref|><|det|>[[580, 270, 999, 904]]<|/det|>"
        "<|ref|>The giraffe at the front<|/ref|><|det|>[[26, 31, 632, 998], [1, 2, 3, 4]]<|/det|>"
        "<|end▁of▁sentence|>"
    )
    assert boxes(text, "deepseek-vl2") == [
        ("The giraffe at the back", (580, 270, 999, 904)),
        ("The giraffe at the front", (26, 31, 632, 998)),
        ("The giraffe at the front", (1, 2, 3, 4)),
    ]


def test_deepseek_truncated():
    parsed = parse("<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4], [5, 6", "deepseek-vl2")
    assert parsed.truncated


# --- properties -------------------------------------------------------------------------

_labels = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: s.strip() == s and s
)
_coord = st.integers(min_value=0, max_value=5000)
_objects = st.lists(
    st.fixed_dictionaries({"bbox_2d": st.lists(_coord, min_size=4, max_size=4), "label": _labels}),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(objs=_objects, indent=st.sampled_from([None, 0, 2, "\t"]), fence=st.booleans(),
       prose=st.text(max_size=40).filter(lambda s: not any(c in s for c in "{}[]\"'`")))
def test_roundtrip_any_formatting(objs, indent, fence, prose):
    body = json.dumps(objs, indent=indent, ensure_ascii=False)
    text = f"{prose}\n```json\n{body}\n```\n{prose}" if fence else f"{prose} {body} {prose}"
    parsed = parse_json_objects(text)
    assert [(o.label, list(map(int, o.coords))) for o in parsed.objects] == [
        (o["label"], o["bbox_2d"]) for o in objs
    ]
    assert not parsed.truncated


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(text):
    for dialect in ("qwen2.5-vl", "qwen3-vl", "qwen2-vl", "qwen-vl", "deepseek-vl2"):
        parse(text, dialect)


def test_cut_off_second_block_after_a_complete_one_is_flagged():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\nmore: {"bbox_2d": [5, 6'
    parsed = parse(text, Q25)
    assert [o.label for o in parsed.objects] == ["a"]
    assert parsed.truncated
