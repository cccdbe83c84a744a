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
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any

from grounding.parsing.fields import COORD_KEYS, InvalidObject, object_from_dict
from grounding.parsing.types import ParsedOutput, RawObject

_VALUE_START = "{[,:"
_SIGNIFICANT = re.compile(r"[{}\[\]\"'\\\n]")
_LITERALS = {"true": True, "false": False, "null": None, "none": None}
_DECODER = json.JSONDecoder()


def parse_json_objects(text: str) -> ParsedOutput:
    fast = _parse_whole(text)
    if fast is not None:
        return fast
    matches, truncated = _match_braces(text)
    objects: list[RawObject] = []
    invalid = 0
    resume = 0
    for start in sorted(matches):
        if start < resume:
            continue
        end = matches[start]
        value = load_lenient(text[start : end + 1])
        if value is None:
            continue
        found = list(_grounding_dicts(value))
        if not found:
            continue
        for obj in found:
            try:
                objects.append(object_from_dict(obj, start=start))
            except InvalidObject:
                invalid += 1
        resume = end + 1
    return ParsedOutput(objects=tuple(objects), truncated=truncated, invalid=invalid)


def _parse_whole(text: str) -> ParsedOutput | None:
    """The common case, one well-formed JSON value (fenced or not): one ``json.loads``."""
    bracket, brace = text.find("["), text.find("{")
    first = bracket if brace < 0 or 0 <= bracket < brace else brace  # -1: neither
    last = max(text.rfind("]"), text.rfind("}"))
    if first < 0 or last < first or text.find("{", last) >= 0 or text.find("[", last) >= 0:
        return None
    try:
        # json.loads(text[first : last + 1]) without the copy and the wrapper: the value
        # must start at `first` and end exactly at `last`.
        value, end = _DECODER.raw_decode(text, first)
    except (json.JSONDecodeError, RecursionError):
        return None
    if end != last + 1:
        return None
    objects: list[RawObject] = []
    invalid = 0
    for obj in _grounding_dicts(value):
        try:
            objects.append(object_from_dict(obj, first))
        except InvalidObject:
            invalid += 1
    return ParsedOutput(tuple(objects), False, invalid) if objects or invalid else None


def load_lenient(candidate: str) -> Any | None:
    """Parse one JSON-ish value: strict JSON, then Python-literal syntax; None if neither."""
    try:
        return json.loads(candidate)
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
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(type(node).__name__)


def _grounding_dicts(value: Any) -> Iterator[dict]:
    """Dicts with a coordinate key, found at any depth; a match is not searched further."""
    if isinstance(value, dict):
        if not COORD_KEYS.isdisjoint(value):  # only a str key can equal a coordinate key
            yield value
            return
        for v in value.values():
            yield from _grounding_dicts(v)
    elif isinstance(value, list):
        for v in value:
            if type(v) is dict and not COORD_KEYS.isdisjoint(v):
                yield v  # the usual answer, a list of objects: no generator per item
            else:
                yield from _grounding_dicts(v)


def _match_braces(text: str) -> tuple[dict[int, int], bool]:
    """Map each ``{`` to its matching ``}`` in one pass; report whether the text is cut off.

    Quotes open a string only where JSON allows a value or key to start (after ``{[,:``),
    so apostrophes and inch marks in surrounding prose do not hide the JSON that follows;
    a string never runs past a newline. Brackets are tracked with one stack so a closing
    ``]`` discards stray unclosed ``{`` inside it; anything still open at the end of the
    text means the model was cut off.
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
    return matches, truncated


def _opens_value(text: str, i: int) -> bool:
    """A quote opens a string where JSON allows a key or value: after ``{[,:`` or at start."""
    j = i - 1
    while j >= 0 and text[j] in " \t\r\n":
        j -= 1
    return j < 0 or text[j] in _VALUE_START
