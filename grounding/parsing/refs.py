"""Grounding written as special tokens: a reference phrase followed by one or more boxes.

Qwen-VL, Qwen2-VL and DeepSeek-VL2 share this shape and differ only in the tokens, so
one parser serves all three, configured by a :class:`RefSyntax`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grounding.parsing.fields import NUMBER
from grounding.parsing.types import ParsedOutput, RawObject


@dataclass(frozen=True)
class RefSyntax:
    ref: tuple[str, str]
    box: tuple[str, str]
    quad: tuple[str, str] | None = None


QWEN_VL = RefSyntax(ref=("<ref>", "</ref>"), box=("<box>", "</box>"), quad=("<quad>", "</quad>"))
QWEN2_VL = RefSyntax(
    ref=("<|object_ref_start|>", "<|object_ref_end|>"),
    box=("<|box_start|>", "<|box_end|>"),
    quad=("<|quad_start|>", "<|quad_end|>"),
)
DEEPSEEK_VL2 = RefSyntax(ref=("<|ref|>", "<|/ref|>"), box=("<|det|>", "<|/det|>"))

# What a Qwen2-VL answer looks like once a server decoded it with skip_special_tokens:
# "the cat(100,200),(300,400)". Only used when no box token is present at all.
_BARE_BOX = re.compile(
    r"(?P<label>[^()\n.:;]*?)\s*\(\s*(?P<a>[-\d.]+)\s*,\s*(?P<b>[-\d.]+)\s*\)\s*,\s*"
    r"\(\s*(?P<c>[-\d.]+)\s*,\s*(?P<d>[-\d.]+)\s*\)"
)


def _compile(syntax: RefSyntax) -> re.Pattern[str]:
    parts = [
        f"{re.escape(syntax.ref[0])}(?P<ref>.*?){re.escape(syntax.ref[1])}",
        f"{re.escape(syntax.box[0])}(?P<box>.*?){re.escape(syntax.box[1])}",
    ]
    if syntax.quad:
        parts.append(f"{re.escape(syntax.quad[0])}(?P<quad>.*?){re.escape(syntax.quad[1])}")
    return re.compile("|".join(parts), re.S)


_PATTERNS: dict[RefSyntax, re.Pattern[str]] = {}


def parse_refs(text: str, syntax: RefSyntax, *, bare_fallback: bool = False) -> ParsedOutput:
    """Each box takes the most recent reference phrase as its label.

    A box span holding several groups of four numbers (DeepSeek-VL2's ``[[..],[..]]``) is
    several boxes; two numbers make a point; a quad (eight numbers) becomes its enclosing
    box with the quad kept in ``attributes["quad"]``.
    """
    pattern = _PATTERNS.setdefault(syntax, _compile(syntax))
    objects: list[RawObject] = []
    invalid = 0
    label: str | None = None
    for m in pattern.finditer(text):
        if m.group("ref") is not None:
            label = m.group("ref").strip() or None
            continue
        quad = m.groupdict().get("quad")
        values = [float(n) for n in NUMBER.findall(m.group("box") if quad is None else quad)]
        if quad is not None:
            if len(values) != 8:
                invalid += 1
                continue
            xs, ys = values[0::2], values[1::2]
            objects.append(RawObject("box", (min(xs), min(ys), max(xs), max(ys)), label,
                                     {"quad": values}, start=m.start()))
        elif len(values) == 2:
            objects.append(RawObject("point", tuple(values), label, {}, start=m.start()))
        elif values and len(values) % 4 == 0:
            objects.extend(RawObject("box", tuple(values[i : i + 4]), label, {}, start=m.start())
                           for i in range(0, len(values), 4))
        else:
            invalid += 1
    if not objects and bare_fallback and syntax.box[0] not in text:
        for m in _BARE_BOX.finditer(text):
            coords = tuple(float(m.group(k)) for k in "abcd")
            objects.append(RawObject("box", coords, m.group("label").strip() or None, {},
                                     start=m.start()))
    return ParsedOutput(tuple(objects), truncated=_cut_inside(text, syntax), invalid=invalid)


def _cut_inside(text: str, syntax: RefSyntax) -> bool:
    """True when the last opening token has no closing token after it."""
    pairs = [syntax.ref, syntax.box, *([syntax.quad] if syntax.quad else [])]
    return any(text.rfind(open_) > text.rfind(close) for open_, close in pairs)
