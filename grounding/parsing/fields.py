"""Turning one parsed JSON-like dict into a RawObject: which key holds the coordinates,
which holds the label, and how loosely numbers may be written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from grounding.parsing.types import Kind, RawObject

BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box", "bounding_box", "bndbox", "xyxy")
POINT_KEYS = ("point_2d", "point", "keypoint", "coordinate")
COORD_KEYS = frozenset((*BOX_KEYS, *POINT_KEYS))

# Where models put the object's name, most specific first. Qwen2.5-VL writes `label`;
# its OCR prompts give `text_content`; Qwen3-VL "omni" prompts give `name_en`/`name_zh`
# or a nested `names: {"en": ...}`; free-form answers use the rest.
LABEL_KEYS = (
    "label",
    "name",
    "name_en",
    "names",
    "text_content",
    "text",
    "description",
    "class",
    "class_name",
    "category",
    "object",
    "phrase",
    "caption",
)

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class InvalidObject(ValueError):
    """A dict that names coordinates but whose coordinates are unusable."""


def coord_key(obj: Mapping[str, Any]) -> str | None:
    """The key holding coordinates, or None when the dict is not a grounding object."""
    for key in (*BOX_KEYS, *POINT_KEYS):
        if key in obj:
            return key
    return None


def numbers(value: Any) -> list[float]:
    """Flatten numbers written as ints, floats, numeric strings or nested lists."""
    if isinstance(value, bool):
        raise InvalidObject(f"boolean {value!r} is not a coordinate")
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        found = NUMBER.findall(value)
        if not found:
            raise InvalidObject(f"no number in {value!r}")
        return [float(n) for n in found]
    if isinstance(value, Mapping):
        # {"x1":..,"y1":..,"x2":..,"y2":..} or {"x":..,"y":..}
        for keys in (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax"), ("x", "y")):
            if all(k in value for k in keys):
                return [n for k in keys for n in numbers(value[k])]
        raise InvalidObject(f"unrecognised coordinate mapping {dict(value)!r}")
    if isinstance(value, list | tuple):
        if all(type(v) is int or type(v) is float for v in value):
            return [float(v) for v in value]
        return [n for item in value for n in numbers(item)]
    raise InvalidObject(f"{type(value).__name__} is not a coordinate")


def label_of(obj: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(label, key it came from). Nested dicts prefer their English entry."""
    for key in LABEL_KEYS:
        if key in obj:
            text = _text(obj[key])
            if text:
                return text, key
    # Any other name-like key, e.g. `name_fr` or `label_en`.
    for key, value in obj.items():
        if key.startswith(("name", "label")):
            text = _text(value)
            if text:
                return text, key
    return None, None


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, Mapping):
        for key in ("en", "english", "en_US", "name"):
            if key in value and isinstance(value[key], str):
                return value[key].strip() or None
        for v in value.values():
            if isinstance(v, str) and v.strip():
                return v.strip()
    return None


def object_from_dict(obj: Mapping[str, Any], start: int = 0) -> RawObject:
    """Build a RawObject; raises InvalidObject when the coordinates are unusable."""
    key = coord_key(obj)
    if key is None:
        raise InvalidObject("no coordinate key")
    coords = numbers(obj[key])
    kind: Kind
    if key in BOX_KEYS and len(coords) == 4:
        kind = "box"
    elif len(coords) == 2:
        kind = "point"
    elif key in POINT_KEYS and len(coords) == 4:
        # Some answers put a box under `point_2d`: believe the numbers, not the key.
        kind = "box"
    else:
        raise InvalidObject(f"{key} holds {len(coords)} numbers")
    label, label_key = label_of(obj)
    # A nested label (`names: {"en", "zh"}`) stays in attributes: it holds the other languages.
    drop = {key} if label_key is None or not isinstance(obj[label_key], str) else {key, label_key}
    attributes = {k: v for k, v in obj.items() if k not in drop}
    return RawObject(kind=kind, coords=tuple(coords), label=label, attributes=attributes,
                     start=start)
