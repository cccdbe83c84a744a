"""Turning one parsed JSON-like dict into a RawObject: which key holds the coordinates,
which holds the label, and how loosely numbers may be written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from grounding.parsing.types import Kind, RawObject, raw_object

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


_COORD_KEY_ORDER = (*BOX_KEYS, *POINT_KEYS)
_PLAIN_NUMBER_TYPES = frozenset((int, float))


def coord_key(obj: Mapping[str, Any]) -> str | None:
    """The key holding coordinates, or None when the dict is not a grounding object."""
    for key in _COORD_KEY_ORDER:
        if key in obj:
            return key
    return None


def numbers(value: Any) -> list[float]:
    """Flatten numbers written as ints, floats, numeric strings or nested lists."""
    if type(value) is list and _PLAIN_NUMBER_TYPES.issuperset(map(type, value)):
        return list(map(float, value))  # what JSON answers hold: [x1, y1, x2, y2]
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
    key = "bbox_2d" if "bbox_2d" in obj else coord_key(obj)  # Qwen's key, first in BOX_KEYS
    if key is None:
        raise InvalidObject("no coordinate key")
    value = obj[key]
    coords: tuple[float, ...] | None = None
    if type(value) is list:  # numbers()' usual cases, without its calls
        if len(value) == 4:
            x1, y1, x2, y2 = value
            if (type(x1) in _PLAIN_NUMBER_TYPES and type(y1) in _PLAIN_NUMBER_TYPES
                    and type(x2) in _PLAIN_NUMBER_TYPES and type(y2) in _PLAIN_NUMBER_TYPES):
                coords = (float(x1), float(y1), float(x2), float(y2))
        elif _PLAIN_NUMBER_TYPES.issuperset(map(type, value)):
            coords = tuple(map(float, value))
    if coords is None:
        coords = tuple(numbers(value))
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
    written = obj.get("label")
    if type(written) is str and (label := written.strip()):  # label_of's usual case
        if len(obj) == 2:
            attributes: dict[str, Any] = {}  # nothing but the coordinates and the label
        else:
            attributes = dict(obj)
            del attributes[key], attributes["label"]
        return raw_object(kind, coords, label, attributes, start)
    label, label_key = label_of(obj)
    # A nested label (`names: {"en", "zh"}`) stays in attributes: it holds the other languages.
    attributes = dict(obj)
    del attributes[key]
    if label_key is not None and isinstance(obj[label_key], str):
        del attributes[label_key]
    return raw_object(kind, coords, label, attributes, start)
