"""Model text -> objects in the model's frame. Pure functions, no model, no image."""

from __future__ import annotations

from grounding.parsing.json_objects import load_lenient, parse_json_objects
from grounding.parsing.markup import parse_html_bboxes, parse_plain_lines, parse_xml_points
from grounding.parsing.refs import DEEPSEEK_VL2, QWEN2_VL, QWEN_VL, RefSyntax, parse_refs
from grounding.parsing.types import Keys, ParsedOutput, RawObject


def parse_qwen_json(text: str, keys: Keys | None = None) -> ParsedOutput:
    """Everything Qwen2.5-VL and Qwen3-VL write: JSON objects, XML points, QwenVL-HTML
    boxes and plain-text box lines, merged in text order.

    The four syntaxes cannot describe the same span, so running all of them loses nothing
    and counts nothing twice; plain lines are only read when nothing structured was found,
    since a line of numbers inside other output is more likely data than a box.
    """
    found = parse_json_objects(text)
    if "<" in text:  # points and HTML boxes are tags: without a "<", neither finds anything
        found = found + parse_xml_points(text) + parse_html_bboxes(text)
    if not found.objects:
        found = found + parse_plain_lines(text)
    return found


def parse_qwen2_vl(text: str, keys: Keys | None = None) -> ParsedOutput:
    return parse_refs(text, QWEN2_VL, bare_fallback=True)


def parse_qwen_vl(text: str, keys: Keys | None = None) -> ParsedOutput:
    return parse_refs(text, QWEN_VL)


def parse_deepseek_vl2(text: str, keys: Keys | None = None) -> ParsedOutput:
    return parse_refs(text, DEEPSEEK_VL2)


__all__ = [
    "DEEPSEEK_VL2",
    "QWEN2_VL",
    "QWEN_VL",
    "Keys",
    "ParsedOutput",
    "RawObject",
    "RefSyntax",
    "load_lenient",
    "parse_deepseek_vl2",
    "parse_html_bboxes",
    "parse_json_objects",
    "parse_plain_lines",
    "parse_qwen2_vl",
    "parse_qwen_json",
    "parse_qwen_vl",
    "parse_refs",
    "parse_xml_points",
]
