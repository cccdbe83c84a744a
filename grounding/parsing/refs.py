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
# "the cat(100,200),(300,400)". Only read when no other syntax found anything.
_BARE_BOX = re.compile(
    r"(?P<label>[^()\n.:;]*?)\s*\(\s*(?P<a>[-\d.]+)\s*,\s*(?P<b>[-\d.]+)\s*\)\s*,\s*"
    r"\(\s*(?P<c>[-\d.]+)\s*,\s*(?P<d>[-\d.]+)\s*\)"
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u300c": "\u300d"}


def clean_label(text: str) -> str | None:
    """A reference phrase as a person reads it: without the spaces around it (Qwen-VL
    writes ``<ref> Woman</ref>``) and without quotes wrapping all of it (``"击掌"``)."""
    text = text.strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text or None


def _compile(syntax: RefSyntax) -> re.Pattern[str]:
    # A run's content never holds "<": an opening token left unterminated therefore ends
    # its run where the next token starts, and never swallows the next well-formed run.
    ref_open, ref_close = map(re.escape, syntax.ref)
    parts = [
        f"{ref_open}(?P<ref>(?:(?!{ref_open}|{re.escape(syntax.box[0])}).)*?){ref_close}",
        # A box run never closed (up to the next token or the end): ``open`` matches "".
        f"{re.escape(syntax.box[0])}(?P<box>[^<]*)(?:{re.escape(syntax.box[1])}|(?P<open>))",
    ]
    if syntax.quad:
        parts.append(f"{re.escape(syntax.quad[0])}(?P<quad>[^<]*){re.escape(syntax.quad[1])}")
    return re.compile("|".join(parts), re.S)


_GROUP = re.compile(r"\[([^\[\]]*)\]")


_PATTERNS: dict[RefSyntax, re.Pattern[str]] = {}


def parse_refs(text: str, syntax: RefSyntax, *, bare_fallback: bool = False) -> ParsedOutput:
    """Each box takes the most recent reference phrase as its label.

    A box span holding several groups of four numbers (DeepSeek-VL2's ``[[..],[..]]``) is
    several boxes; two numbers make a point; a quad (eight numbers) becomes its enclosing
    box with the quad kept in ``attributes["quad"]``; any other count is ``invalid``.

    Broken runs: an opening token with no closing token before the next token is dropped
    (never completed): counted ``invalid``, or ``truncated`` when it is the end of the
    text; the ``[..]`` groups it closed before the break are still read (:func:`_open_run`).
    A reference with no box after it (an echoed prompt) labels nothing; role
    prefixes and end tokens (``<|Assistant|>:``, ``<|im_end|>``, ``<|endoftext|>``,
    ``<｜end▁of▁sentence｜>``) are not runs and are ignored.
    """
    if syntax.box[0] not in text and syntax.ref[0] not in text and (
            syntax.quad is None or syntax.quad[0] not in text):
        return parse_bare(text) if bare_fallback else ParsedOutput()
    pattern = _PATTERNS.setdefault(syntax, _compile(syntax))
    objects: list[RawObject] = []
    invalid = 0
    label: str | None = None
    quads = 0
    for m in pattern.finditer(text):
        if m.group("ref") is not None:
            label = clean_label(m.group("ref"))
            continue
        if m.group("open") is not None:
            last = m.start() == text.rfind(syntax.box[0]) > text.rfind(syntax.box[1])
            found, bad = _open_run(m.group("box"), label, m.start(), last)
            objects.extend(found)
            invalid += bad
            continue
        quad = m.groupdict().get("quad")
        quads += quad is not None
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
    truncated = _cut_inside(text, syntax)
    # Box openers are all runs (closed or open); a quad opener with no closer is not.
    broken = (text.count(syntax.quad[0]) - quads) if syntax.quad else 0
    broken -= 1 if truncated and syntax.quad and _open_at_end(text, syntax.quad) else 0
    return ParsedOutput(tuple(objects), truncated=truncated, invalid=invalid + max(broken, 0))


def _open_run(body: str, label: str | None, start: int, at_end: bool
              ) -> tuple[list[RawObject], int]:
    """A box run whose closing token never came (DeepSeek-VL2's ``[[..], [..`` list): each
    ``[..]`` group the model closed is read (four numbers a box, two a point, else
    invalid); what follows the last closed group is dropped, counted invalid unless this
    is the last run of the text (then the answer was cut off: flagged truncated). Without
    ``[..]`` groups (Qwen-VL's ``(x1,y1),(x2,y2)``) the whole run is what was cut."""
    objects: list[RawObject] = []
    invalid = 0
    tail = None
    for g in _GROUP.finditer(body):
        values = [float(n) for n in NUMBER.findall(g.group(1))]
        if len(values) == 4:
            objects.append(RawObject("box", tuple(values), label, {}, start=start))
        elif len(values) == 2:
            objects.append(RawObject("point", tuple(values), label, {}, start=start))
        else:
            invalid += 1
        tail = body[g.end():]
    if not at_end and (tail is None or NUMBER.search(tail)):
        invalid += 1  # the run was dropped: something after it, so not a cut
    return objects, invalid


def parse_bare(text: str) -> ParsedOutput:
    """``label(x1,y1),(x2,y2)``: Qwen2-VL box tokens a server stripped; a box left open
    at the end of the text (``(877,629),(904,653``) is dropped and flagged truncated."""
    if "(" not in text or "<|box_start|>" in text or "<box>" in text:
        return ParsedOutput()  # box tokens present: the token reader decides, not this
    objects = [RawObject("box", tuple(float(m.group(k)) for k in "abcd"),
                         clean_label(m.group("label")), {}, start=m.start())
               for m in _BARE_BOX.finditer(text)]
    truncated = bool(objects) and text.rfind("(") > text.rfind(")")
    return ParsedOutput(tuple(objects), truncated=truncated)


def _open_at_end(text: str, pair: tuple[str, str]) -> bool:
    """The last opener of ``pair`` has no closer after it: the cut-off run."""
    return text.rfind(pair[0]) > text.rfind(pair[1])


def _cut_inside(text: str, syntax: RefSyntax) -> bool:
    """True when the last opening token has no closing token after it."""
    pairs = [syntax.ref, syntax.box, *([syntax.quad] if syntax.quad else [])]
    return any(text.rfind(open_) > text.rfind(close) for open_, close in pairs)
