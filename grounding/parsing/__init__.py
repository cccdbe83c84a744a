"""Model text -> objects in the model's frame. Pure functions, no model, no image.

One parse function per dialect. Each reads every syntax its family has been seen to
write (tests/fixtures/real_outputs, tests/test_parse_wild.py), in the dialect's frame:

* ``qwen2.5-vl`` / ``qwen3-vl`` (:func:`parse_qwen_json`, :func:`parse_qwen3_vl`): JSON
  objects under any keys (the rule of grounding.parsing.fields), XML points, QwenVL-HTML,
  and the Qwen2-VL box tokens fine-tunes write (``<|object_ref_start|>..<|box_start|>
  (x1,y1),(x2,y2)<|box_end|>``, also as a JSON value); plain ``x1,y1,x2,y2 label`` lines
  and token-stripped ``label(x1,y1),(x2,y2)`` boxes only when nothing else was found.
* ``qwen2-vl`` (:func:`parse_qwen2_vl`): its box/quad tokens, JSON answers (Qwen2-VL asked
  for JSON writes JSON, 0-1000; ``<answer>`` blocks with Python literals), and the bare
  boxes a server leaves when it strips the tokens (only when nothing else was found).
* ``qwen-vl`` (:func:`parse_qwen_vl`): ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``.
* ``deepseek-vl2`` (:func:`parse_deepseek_vl2`): ``<|ref|>..<|/ref|><|det|>[[..]]<|/det|>``.
  No JSON or other syntax has been seen from these two families, so none is read: a
  JSON-looking span in their answers is more likely echoed data than an answer.

One span is never read twice: a token box written as a JSON value is read once, as part
of its JSON object. ``keys`` (a user's ``--box-key``/``--point-key``/``--label-key``)
applies to JSON; token syntaxes have no keys.

Coordinates far outside a relative frame (:func:`within_frame`: beyond half the frame
past either edge, e.g. 9999 in 0-999) are not a box a person would read: such an object
is dropped and counted ``invalid``. Qwen2.5-VL's absolute frame has no bound known at
parse time (values above 1000 are legal on large inputs), so it is not checked there;
the result builder checks against the input size.

Only the answer is read (:func:`answer_part`): the text of a closed ``<think>..</think>``
block is the model's reasoning, and drafts in it are not detections; a ``</think>``
without its opener (chat templates that put ``<think>`` in the prompt) closes reasoning
that began at the start of the text. A ``<think>`` never closed means the answer never
came: nothing is read after it and the answer is flagged truncated. When the text holds
an echoed chat prompt, only what follows the last assistant turn marker is the answer
(``<|im_start|>assistant``, DeepSeek's ``<|Assistant|>``, or, with the special tokens
stripped, a line ``assistant`` after a line ``user``). Offsets are kept: what is not read
is blanked, not cut.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from grounding.parsing.json_objects import (
    json_objects_with_spans,
    load_lenient,
    parse_json_objects,
)
from grounding.parsing.markup import parse_html_bboxes, parse_plain_lines, parse_xml_points
from grounding.parsing.refs import (
    DEEPSEEK_VL2,
    QWEN2_VL,
    QWEN_VL,
    RefSyntax,
    parse_bare,
    parse_refs,
)
from grounding.parsing.types import Keys, ParsedOutput, RawObject

# A complete Qwen2-VL token box written where JSON expects a value: `"bbox": <|box_start|>`.
_VALUE_TOKEN_BOX = re.compile(
    r"(?<=:)(\s*)<\|box_start\|>\s*\(\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\)\s*,\s*"
    r"\(\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\)\s*<\|box_end\|>"
)


_ASSISTANT = re.compile(r"<\|im_start\|>assistant\b|<[|\uff5c]Assistant[|\uff5c]>"
                        r"|^assistant[ \t]*\r?$", re.M)
_USER_LINE = re.compile(r"^user[ \t]*\r?$", re.M)
_THINK = re.compile(r"<think>.*?</think>", re.S)


def answer_part(text: str) -> tuple[str, bool]:
    """(the text with everything that is not the answer blanked out, whether a
    ``<think>`` was left open: the answer never came). See the module docstring."""
    if "ssistant" not in text and "think>" not in text:  # the usual answer: nothing to do
        return text, False
    cut = 0
    if "ssistant" in text:
        for m in _ASSISTANT.finditer(text):
            if m.group(0)[0] == "<" or _USER_LINE.search(text, 0, m.start()):
                cut = m.end()
    if "think>" not in text:
        return " " * cut + text[cut:], False
    closing = text.rfind("</think>")
    if closing >= cut and text.find("<think>", cut, closing) < 0:
        cut = closing + len("</think>")  # reasoning whose opener was in the prompt
    body = _THINK.sub(lambda m: " " * len(m.group(0)), text[cut:])
    opened = body.find("<think>")
    if opened >= 0:  # reasoning cut off: nothing after its opener is an answer
        return " " * cut + body[:opened] + " " * (len(body) - opened), True
    return " " * cut + body, False


def _answer_only(parse: Callable[[str, Keys | None], ParsedOutput]
                 ) -> Callable[[str, Keys | None], ParsedOutput]:
    """A dialect's parser that reads only :func:`answer_part` of the text."""
    @functools.wraps(parse)
    def read(text: str, keys: Keys | None = None) -> ParsedOutput:
        if "ssistant" not in text and "think>" not in text:  # answer_part's usual case
            return parse(text, keys)
        answer, unanswered = answer_part(text)
        found = parse(answer, keys)
        if unanswered and not found.truncated:
            return ParsedOutput(found.objects, True, found.invalid)
        return found

    return read


def _as_json_value(m: re.Match[str]) -> str:
    """The token box as a JSON list of the same length, so offsets do not move."""
    value = f"{m.group(1)}[{m.group(2)}, {m.group(3)}, {m.group(4)}, {m.group(5)}]"
    return value.ljust(len(m.group(0)))


def _json_and_tokens(text: str, keys: Keys | None, syntax: RefSyntax) -> ParsedOutput:
    """JSON objects plus the token runs outside every JSON value that gave objects."""
    has_tokens = syntax.box[0] in text or (syntax.quad is not None and syntax.quad[0] in text)
    source = _VALUE_TOKEN_BOX.sub(_as_json_value, text) if has_tokens else text
    found, spans = json_objects_with_spans(source, keys)
    if not has_tokens:
        return found
    tokens = parse_refs(text, syntax)
    if spans:
        kept = tuple(o for o in tokens.objects if not any(a <= o.start < b for a, b in spans))
        tokens = ParsedOutput(kept, tokens.truncated, tokens.invalid)
    return found + tokens


def within_frame(found: ParsedOutput, norm: float) -> ParsedOutput:
    """Drop (and count ``invalid``) objects with a coordinate beyond half the frame past
    an edge of a 0..``norm`` frame."""
    low, high = -0.5 * norm, 1.5 * norm
    kept = tuple(o for o in found.objects if all(low <= c <= high for c in o.coords))
    if len(kept) == len(found.objects):
        return found
    return ParsedOutput(kept, found.truncated, found.invalid + len(found.objects) - len(kept))


@_answer_only
def parse_qwen_json(text: str, keys: Keys | None = None) -> ParsedOutput:
    """Everything Qwen2.5-VL (and Qwen3-VL) write: JSON objects, XML points, QwenVL-HTML
    boxes, Qwen2-VL box tokens, then plain-text box lines and bare stripped boxes, merged
    in text order (absolute frame: no frame check).

    The syntaxes cannot describe the same span (a token box inside JSON is JSON's), so
    running all of them loses nothing and counts nothing twice; plain lines and bare boxes
    are only read when nothing structured was found, since a line of numbers inside other
    output is more likely data than a box.
    """
    found = _json_and_tokens(text, keys, QWEN2_VL) if "<|" in text else parse_json_objects(
        text, keys)
    if "<" in text:  # points and HTML boxes are tags: without a "<", neither finds anything
        found = found + parse_xml_points(text) + parse_html_bboxes(text)
    if not found.objects:
        found = found + parse_plain_lines(text)
        if not found.objects:
            found = found + parse_bare(text)
    return found


@_answer_only
def parse_qwen3_vl(text: str, keys: Keys | None = None) -> ParsedOutput:
    """Qwen3-VL: the syntaxes of :func:`parse_qwen_json`, in a 0-1000 frame."""
    return within_frame(parse_qwen_json.__wrapped__(text, keys), 1000)  # type: ignore[attr-defined]


@_answer_only
def parse_qwen2_vl(text: str, keys: Keys | None = None) -> ParsedOutput:
    """Qwen2-VL: box/quad tokens, JSON, and bare stripped boxes when nothing else (0-1000)."""
    found = _json_and_tokens(text, keys, QWEN2_VL)
    if not found.objects:
        found = found + parse_bare(text)
    return within_frame(found, 1000)


@_answer_only
def parse_qwen_vl(text: str, keys: Keys | None = None) -> ParsedOutput:
    """Qwen-VL: ``<ref>``/``<box>``/``<quad>`` tokens (0-1000); ``keys`` does not apply."""
    return within_frame(parse_refs(text, QWEN_VL), 1000)


@_answer_only
def parse_deepseek_vl2(text: str, keys: Keys | None = None) -> ParsedOutput:
    """DeepSeek-VL2: ``<|ref|>``/``<|det|>`` tokens (0-999); ``keys`` does not apply."""
    return within_frame(parse_refs(text, DEEPSEEK_VL2), 999)


__all__ = [
    "DEEPSEEK_VL2",
    "QWEN2_VL",
    "QWEN_VL",
    "Keys",
    "ParsedOutput",
    "RawObject",
    "RefSyntax",
    "answer_part",
    "json_objects_with_spans",
    "load_lenient",
    "parse_bare",
    "parse_deepseek_vl2",
    "parse_html_bboxes",
    "parse_json_objects",
    "parse_plain_lines",
    "parse_qwen2_vl",
    "parse_qwen3_vl",
    "parse_qwen_json",
    "parse_qwen_vl",
    "parse_refs",
    "parse_xml_points",
    "within_frame",
]
