"""Recover every grounding object from JSON-ish model text.

Why hand-written and not a JSON-repair library (json-repair was measured): repair
libraries complete whatever is cut off. For an answer cut at ``{"bbox_2d": [5, 6, 7, 8``
json-repair returns a box ``[5, 6, 7, 8]`` although the model may have been writing
``80``; for ``"label": "ca`` it returns the label ``"ca"``. A labeling tool must never
invent coordinates, so this module only accepts objects whose closing brace the model
wrote. It finds candidate objects by matching braces (string-aware), parses each one on
its own (strict JSON first, then Python-literal syntax for single quotes, trailing commas
and ``True``/``None``) and, when a candidate does not parse (a stray ``{`` in the middle,
say), descends to the next brace instead of giving up, so every well-formed object after
the damage is still recovered.

Which values of an object are coordinates, label and attributes: grounding.parsing.fields.
Keys that repeat inside one object are kept pair by pair (``object_pairs_hook``) and read
as one object per group. The one exception to "only closed objects": an object cut off at
the end of the answer whose keys repeat (a list written as one object) gives its complete
groups, all but the last, which the cut may have shortened; the answer is flagged truncated.

An object lost to malformed JSON (a literal newline or an unescaped quote inside a
string, a missing comma) is not read but counted ``invalid``: an innermost ``{..}`` that
does not parse, holds no object that was read, and names a coordinate key
(:data:`~grounding.parsing.fields.COORD_KEYS`) with a number after it -- so an echoed
format such as ``{"bbox_2d": [x1, y1, x2, y2]}`` is not counted.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any

from grounding.parsing.fields import (
    COORD_KEYS,
    RepeatedKeys,
    groups,
    object_pairs,
    objects_from_dict,
)
from grounding.parsing.types import Keys, ParsedOutput, RawObject

_VALUE_START = "{[,:"
_SIGNIFICANT = re.compile(r"[{}\[\]\"'\\\n]")
_LITERALS = {"true": True, "false": False, "null": None, "none": None}
_DECODER = json.JSONDecoder()
_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=object_pairs)


def _decode(text: str, start: int) -> tuple[Any, int]:
    """``raw_decode`` that keeps repeated keys (RepeatedKeys). The hook that keeps every
    pair costs a Python call per object, so the text is decoded plainly first and again
    with the hook only when its dicts hold fewer entries than the text has ``":`` (a key
    repeated, or a ``":`` inside a string: the second decode settles it)."""
    value, end = _DECODER.raw_decode(text, start)
    written = text.count('":', start, end)
    if written and _entries(value) != written:
        value, end = _PAIRS_DECODER.raw_decode(text, start)
    return value, end


def _entries(value: Any) -> int:
    """Key-value pairs in all the dicts of a decoded value."""
    if type(value) is list:
        if all(type(v) is dict for v in value):  # a list of flat objects: the usual answer
            n = 0
            for v in value:
                n += len(v)
                if any(type(x) is dict or (type(x) is list and x and type(x[0]) is not int
                       and type(x[0]) is not float) for x in v.values()):
                    n += sum(_entries(x) for x in v.values())
            return n
        return sum(_entries(v) for v in value)
    if type(value) is dict:
        return len(value) + sum(_entries(v) for v in value.values()
                                if type(v) is dict or type(v) is list)
    return 0


def parse_json_objects(text: str, keys: Keys | None = None) -> ParsedOutput:
    return json_objects_with_spans(text, keys)[0]


Span = tuple[int, int]


def json_objects_with_spans(text: str, keys: Keys | None = None
                            ) -> tuple[ParsedOutput, list[Span]]:
    """The objects, and the spans of text the JSON values that gave them cover (so that
    another syntax does not read the same span twice)."""
    fast = _parse_whole(text, keys)
    if fast is not None:
        return fast
    matches, truncated, unclosed = _match_braces(text)
    objects: list[RawObject] = []
    spans: list[Span] = []
    invalid = 0
    resume = 0
    failed: list[Span] = []
    for start in sorted(matches):
        if start < resume:
            continue
        end = matches[start]
        value = load_lenient(text[start : end + 1])
        if value is None:
            failed.append((start, end + 1))
            continue
        found, bad, any_coords = _read(value, start, keys)
        if not any_coords:
            continue
        objects.extend(found)
        invalid += bad
        spans.append((start, end + 1))
        resume = end + 1
    for start in unclosed:
        if start >= resume:
            found = _cut_repeated(text, start, keys)
            if found:
                objects.extend(found)
                spans.append((start, len(text)))
                resume = len(text)
    if failed:
        invalid += _unreadable(text, failed, spans)
    return ParsedOutput(objects=tuple(objects), truncated=truncated, invalid=invalid), spans


_NAMES_COORDINATES = re.compile(
    r"""["'](?:""" + "|".join(sorted(COORD_KEYS)) + r""")["']\s*:\s*[\["'\s]*[-+]?\.?\d""")


def _unreadable(text: str, failed: list[Span], read: list[Span]) -> int:
    """Objects lost to malformed JSON (a newline or an unescaped quote inside a string, a
    missing comma): innermost ``{..}`` that did not parse, named a coordinate key with a
    number after it, and hold no object that was read."""
    count = 0
    for i, (start, end) in enumerate(failed):
        if i + 1 < len(failed) and failed[i + 1][0] < end:
            continue  # not innermost: the broken object is the one inside
        if any(start <= a < end for a, _ in read):
            continue
        if _NAMES_COORDINATES.search(text, start, end):
            count += 1
    return count


def _read(value: Any, start: int, keys: Keys | None) -> tuple[list[RawObject], int, bool]:
    """Objects in a parsed value at any depth, in text order: a dict with coordinates is
    an object (or several), followed by the objects nested in it (``parts``, ``children``);
    any other dict or list is searched."""
    objects: list[RawObject] = []
    invalid = 0
    any_coords = False
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            found = objects_from_dict(v, start, keys)
            if found is None:
                stack.extend(reversed(v.values()))
            else:
                any_coords = True
                objects.extend(found[0])
                invalid += found[1]
                stack.extend(reversed(_nested(v)))
        elif isinstance(v, list):
            stack.extend(reversed(v))
    return objects, invalid, any_coords


def _nested(obj: dict) -> list[Any]:
    """The values of an object that may hold objects of their own: dicts, and lists that
    are not plain numbers (coordinates)."""
    return [x for x in obj.values()
            if type(x) is dict or (type(x) is list and x and (type(x[0]) is dict
                                                             or type(x[0]) is list))]


def _cut_repeated(text: str, start: int, keys: Keys | None) -> list[RawObject]:
    """The complete groups of an object cut off at the end whose keys repeat."""
    body = text[start:]
    # Close the object after its last complete pair: before the last top-level comma.
    for cut in _top_level_commas(body)[::-1]:
        value = load_lenient(body[:cut] + "}")
        if isinstance(value, dict):
            pairs = value.pairs if type(value) is RepeatedKeys else list(value.items())
            complete = groups(pairs)[:-1]  # the last group may be missing fields
            if not complete:
                return []
            objects: list[RawObject] = []
            for group in complete:
                found = objects_from_dict(group, start, keys)
                if found is not None:
                    objects.extend(found[0])
            return objects
    return []


def outside_strings(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, character) of each character of ``text`` from ``start`` that is not inside
    a quoted string ("..." or '...', backslash escapes honoured; the quotes themselves
    are not yielded): what bracket counting looks at."""
    quote: str | None = None
    escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if quote is not None:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        else:
            yield i, c


def _top_level_commas(body: str) -> list[int]:
    depth = 0
    out = []
    for i, c in outside_strings(body):
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif c == "," and depth == 1:
            out.append(i)
    return out


def _parse_whole(text: str, keys: Keys | None) -> tuple[ParsedOutput, list[Span]] | None:
    """The common case, one well-formed JSON value (fenced or not): one ``json.loads``."""
    bracket, brace = text.find("["), text.find("{")
    first = bracket if brace < 0 or 0 <= bracket < brace else brace  # -1: neither
    last = max(text.rfind("]"), text.rfind("}"))
    if first < 0 or last < first or text.find("{", last) >= 0 or text.find("[", last) >= 0:
        return None
    try:
        # json.loads(text[first : last + 1]) without the copy and the wrapper: the value
        # must start at `first` and end exactly at `last`.
        value, end = _decode(text, first)
    except (json.JSONDecodeError, RecursionError):
        return None
    if end != last + 1:
        return None
    if type(value) is list and keys is None:  # the usual answer, a list of objects
        objects: list[RawObject] = []
        invalid = 0
        for item in value:
            found = objects_from_dict(item, first) if type(item) is dict else None
            if found is None:
                more, bad, _ = _read(item, first, keys)
                objects.extend(more)
                invalid += bad
            else:
                objects.extend(found[0])
                invalid += found[1]
                if len(item) > 2 and (nested := _nested(item)):
                    more, bad, _ = _read(nested, first, keys)
                    objects.extend(more)
                    invalid += bad
    else:
        objects, invalid, _ = _read(value, first, keys)
    if not objects and not invalid:
        return None
    return ParsedOutput(tuple(objects), False, invalid), [(first, last + 1)]


def load_lenient(candidate: str) -> Any | None:
    """Parse one JSON-ish value: strict JSON, then Python-literal syntax; None if neither."""
    stripped = candidate.strip()
    try:
        value, end = _decode(stripped, 0)
        if end == len(stripped):
            return value
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        tree = ast.parse(candidate.strip(), mode="eval")
        return _literal(tree.body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _literal(node: ast.AST) -> Any:
    """ast.literal_eval, but also accepting JSON's true/false/null as names."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id.lower() in _LITERALS:
            return _LITERALS[node.id.lower()]
        raise ValueError(node.id)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking")
        return object_pairs([(_literal(k), _literal(v))
                             for k, v in zip(node.keys, node.values, strict=True)])
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(type(node).__name__)


def _match_braces(text: str) -> tuple[dict[int, int], bool, list[int]]:
    """Map each ``{`` to its matching ``}`` in one pass; report whether the text is cut off.

    Quotes open a string only where JSON allows a value or key to start (after ``{[,:``),
    so apostrophes and inch marks in surrounding prose do not hide the JSON that follows;
    a string never runs past a newline. Brackets are tracked with one stack so a closing
    ``]`` discards stray unclosed ``{`` inside it; anything still open at the end of the
    text means the model was cut off (the ``{`` still open are returned).
    """
    matches: dict[int, int] = {}
    stack: list[tuple[str, int]] = []
    quote: str | None = None
    escaped_at = -1  # index of a character escaped by a backslash inside a string
    # Visit only the characters that matter; everything else is skipped by the regex.
    for m in _SIGNIFICANT.finditer(text):
        i = m.start()
        c = text[i]
        if quote is not None:
            if i == escaped_at:
                continue
            if c == "\\":
                escaped_at = i + 1
            elif c == quote or c == "\n":
                quote = None
            continue
        if c in "\"'":
            if _opens_value(text, i):
                quote = c
        elif c in "{[":
            stack.append((c, i))
        elif c in "}]":
            opener = "{" if c == "}" else "["
            depth = next((d for d in range(len(stack) - 1, -1, -1) if stack[d][0] == opener), None)
            if depth is not None:
                del stack[depth + 1 :]
                _, start = stack.pop()
                if opener == "{":
                    matches[start] = i
    truncated = bool(stack) or quote is not None
    return matches, truncated, [i for c, i in stack if c == "{"]


def _opens_value(text: str, i: int) -> bool:
    """A quote opens a string where JSON allows a key or value: after ``{[,:`` or at start."""
    j = i - 1
    while j >= 0 and text[j] in " \t\r\n":
        j -= 1
    return j < 0 or text[j] in _VALUE_START
