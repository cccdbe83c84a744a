"""Every object in every real Qwen output comes out, with the right label and coordinates.

Expected values are either written out by hand from the fixture or, for files that are
valid Python literals once the fence is removed, read by an independent oracle
(``ast.literal_eval``) so the parser is checked against a different parser.
"""

from __future__ import annotations

import ast
import re

import pytest

from grounding import parse, result_from_text
from tests.real_outputs import all_names, raw_text
from tests.test_parse_wild import WILD


def _fenced_literal(text: str) -> list[dict]:
    body = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    return ast.literal_eval(body)


# file -> (dialect, label key the oracle reads)
ORACLE_FILES = {
    "qwen25vl_spatial_small_cakes.txt": ("qwen2.5-vl", "label"),
    "qwen25vl_spatial_cakes_describe.txt": ("qwen2.5-vl", "label"),
    "qwen25vl_spatial_top_right_brown_cake.txt": ("qwen2.5-vl", "label"),
    "qwen25vl_spatial_paper_fox_shadow_abs_gt1000.txt": ("qwen2.5-vl", "label"),
    "qwen25vl_spatial_brave_person.txt": ("qwen2.5-vl", "label"),
    "qwen25vl_spatial_sunglasses.txt": ("qwen2.5-vl", "label"),
    "qwen25vl_spatial_counting_json_plus_prose.txt": ("qwen2.5-vl", "label"),
    "qwen25vl_ocr_text_spotting_receipt.txt": ("qwen2.5-vl", "text_content"),
    "qwen3vl_2d_grounding_dining_table.txt": ("qwen3-vl", "label"),
    "qwen3vl_omni_food_name_zh_en.txt": ("qwen3-vl", "name_en"),
}


def test_every_fixture_is_covered():
    covered = set(ORACLE_FILES) | {
        "qwen25vl_docparsing_qwenvl_html.txt",
        "qwen25vl_spatial_plaintext_format.txt",
        "qwen3vl_omni_anime_nested_names_MALFORMED.txt",
        "qwen3vl_spatial_point_free_space.txt",
        "qwen3vl_think_with_images_zoom_tool_call.txt",
    } | set(WILD)  # the answers of issue 15, in tests/test_parse_wild.py
    assert set(all_names()) == covered


@pytest.mark.parametrize("name", sorted(ORACLE_FILES))
def test_json_outputs_match_an_independent_parser(name):
    dialect, label_key = ORACLE_FILES[name]
    text = raw_text(name)
    expected = _fenced_literal(text)
    parsed = parse(text, dialect)
    assert not parsed.truncated
    assert parsed.invalid == 0
    assert [o.kind for o in parsed.objects] == ["box"] * len(expected)
    assert [o.coords for o in parsed.objects] == [tuple(map(float, e["bbox_2d"])) for e in expected]
    assert [o.label for o in parsed.objects] == [e[label_key] for e in expected]


def test_counts_of_the_bigger_files():
    # Pinned by hand so a broken oracle cannot hide a loss.
    assert len(parse(raw_text("qwen25vl_ocr_text_spotting_receipt.txt"), "qwen2.5-vl").boxes) == 39
    assert len(parse(raw_text("qwen3vl_2d_grounding_dining_table.txt"), "qwen3-vl").boxes) == 27
    assert len(parse(raw_text("qwen25vl_spatial_small_cakes.txt"), "qwen2.5-vl").boxes) == 12


def test_food_keeps_the_chinese_name_as_attribute():
    objs = parse(raw_text("qwen3vl_omni_food_name_zh_en.txt"), "qwen3-vl").objects
    assert objs[2].label == "Potato Carrot Pork Rib Soup"
    assert objs[2].attributes == {"name_zh": "土豆胡萝卜排骨汤"}


def test_malformed_nested_names_recovers_all_nine_characters():
    parsed = parse(raw_text("qwen3vl_omni_anime_nested_names_MALFORMED.txt"), "qwen3-vl")
    got = [(o.label, o.coords) for o in parsed.objects]
    assert got == [
        ("Giyu Tomioka", (0, 52, 477, 999)),
        ("Muichiro Tokito", (197, 347, 520, 999)),
        ("Sanemi Shinazugawa", (220, 54, 500, 595)),
        ("Mitsuri Kanroji", (431, 84, 565, 401)),
        ("Gyomei Himejima", (541, 0, 667, 333)),
        ("Obanai Iguro", (649, 116, 794, 643)),  # the object after the stray '{'
        ("Kyojuro Rengoku", (762, 34, 999, 555)),
        ("Shinobu Kocho", (434, 322, 686, 999)),
        ("Tengen Uzui", (590, 444, 999, 999)),
    ]
    assert parsed.objects[5].attributes == {"names": {"zh": "伊黑小芭内", "en": "Obanai Iguro"}}
    assert not parsed.truncated  # a stray brace is damage, not a cut-off answer


def test_plain_text_format():
    parsed = parse(raw_text("qwen25vl_spatial_plaintext_format.txt"), "qwen2.5-vl")
    assert [(o.kind, o.label, o.coords) for o in parsed.objects] == [
        ("box", "cakes", (43, 378, 996, 957))
    ]


def test_qwenvl_html_document_layout():
    text = raw_text("qwen25vl_docparsing_qwenvl_html.txt")
    parsed = parse(text, "qwen2.5-vl")
    # Every data-bbox attribute in the answer is one box, in document order.
    expected = [tuple(map(float, m.split())) for m in re.findall(r'data-bbox="([^"]+)"', text)]
    assert len(expected) == 11
    assert [o.coords for o in parsed.objects] == expected
    assert [o.label for o in parsed.objects] == [
        "h2", "p", "image", "img", "h2", "p", "p", "p", "image", "img", "p",
    ]
    assert parsed.objects[0].attributes == {"tag": "h2", "text": "Qwen2.5 Technical Report"}
    assert parsed.objects[-1].attributes["text"].startswith("Figure 1: In the iterative")


def test_qwen3_point():
    parsed = parse(raw_text("qwen3vl_spatial_point_free_space.txt"), "qwen3-vl")
    assert [(o.kind, o.label, o.coords) for o in parsed.objects] == [
        ("point", "point_1", (925, 618))
    ]
    result = result_from_text(raw_text("qwen3vl_spatial_point_free_space.txt"), "qwen3-vl",
                              image_size=(480, 640))
    assert result.points[0].point == pytest.approx((925 / 1000 * 480, 618 / 1000 * 640))


def test_tool_call_with_label_first_and_extra_key():
    parsed = parse(raw_text("qwen3vl_think_with_images_zoom_tool_call.txt"), "qwen3-vl")
    assert [(o.label, o.coords, o.attributes) for o in parsed.objects] == [
        ("main hanging sign for Hop Inn", (574, 301, 660, 468), {"img_idx": 0})
    ]


def test_receipt_rescales_like_the_notebook():
    # The notebook's own numbers: input 868x1400, original 870x1398.
    result = result_from_text(raw_text("qwen25vl_ocr_text_spotting_receipt.txt"), "qwen2.5-vl",
                              image_size=(870, 1398), input_size=(868, 1400))
    first = result.boxes[0]
    assert first.label == "UNIHAKKA INTERNATIONAL SDN BHD"
    assert first.bbox == pytest.approx((125 * 870 / 868, 169 * 1398 / 1400,
                                        754 * 870 / 868, 208 * 1398 / 1400))
    assert first.model_bbox == (125, 169, 754, 208)
    assert len(result.boxes) == 39


def test_absolute_coordinates_above_1000_stay_on_the_image():
    # 1098..1900 only fit a large absolute frame: as relative 0-1000 they would be off-image.
    text = raw_text("qwen25vl_spatial_paper_fox_shadow_abs_gt1000.txt")
    result = result_from_text(text, "qwen2.5-vl", image_size=(2000, 1500),
                              input_size=(1988, 1484))
    assert len(result.boxes) == 1 and not result.dropped
    x1, y1, x2, y2 = result.boxes[0].bbox
    assert 0 < x1 < x2 <= 2000 and 0 < y1 < y2 <= 1500


def test_qwen3_edges_at_999_map_inside_the_image():
    result = result_from_text(raw_text("qwen3vl_2d_grounding_dining_table.txt"), "qwen3-vl",
                              image_size=(640, 479))
    assert len(result.boxes) == 27
    assert max(b.bbox[2] for b in result.boxes) == pytest.approx(999 / 1000 * 640)
