"""Turning one parsed JSON-like dict into objects: which values are coordinates, which
field is the label, and how loosely numbers may be written.

The rule, for any dict at any depth of a JSON-like answer (no list of key names needed,
so a prompt's own schema -- ``position``, ``coordinates``, ``result``, a tool call's
``arguments`` -- is read as it is):

* **Coordinates.** When the dict holds a known coordinate key (:data:`BOX_KEYS`,
  :data:`POINT_KEYS`), the first of them is read, in any of the shapes models write
  (numbers, numeric strings, ``"[1, 2, 3, 4]"``, ``[[x1, y1], [x2, y2]]``, ``{"x1": ..}``)
  and a value that is none of them counts as ``invalid``. Otherwise every value that is a
  list of 4 numbers is a box and every list of 2 numbers a point, whatever its key; a list
  of such lists is several boxes (or points) sharing the dict's label. A dict with no
  coordinate is not an object: the dicts inside it are searched instead.
* **Nested objects.** A dict with coordinates is an object, and the dicts it holds are
  searched too: a person's ``parts: [{"label": "head", "bbox_2d": ..}]`` are objects of
  their own, after the person in text order.
* **Containers.** A dict that holds grounding objects (dicts with coordinates, at any
  depth) is a container, not an object: its own loose number lists (``"wh": [640,
  480]``, ``"counts": [3, 1, 0, 2]``) are read as coordinates only if it also has a label
  of its own (by the label rule below). A known coordinate key is always read.
* **Ambiguous numbers.** Under a key that is not a known coordinate key, four (or two)
  numbers are not read as coordinates when the key names something else
  (:data:`NOT_COORDINATE_WORDS`: ``color``, ``rgb``, ``size``, ``shape``, ``scale``,
  ``resolution`` ...) or when the numbers look like a colour with an alpha (integers above
  1 beside a fraction, ``[255, 0, 0, 0.5]``); they stay in ``attributes``. Values far
  outside the frame are judged by the dialect, which knows the frame
  (grounding.parsing.within_frame).
* **Label.** The first :data:`LABEL_KEYS` key holding text, else any key whose name
  contains ``name`` or ``label`` (``object_name``, ``label_fr``), else the object's only
  text field (``{"what": "cup", ...}``) unless it is one that says something else
  (:data:`NOT_LABELS`: a tool call's ``action: "click"`` is not a name); with none, or
  several other text fields, no label (``--label-key`` names it). When several label
  keys are present the first in that order wins and the others stay attributes.
* **Attributes.** Every other field, as written. A model-written ``confidence`` is an
  attribute, never the score (scores come from log-probabilities).
* **Repeated keys.** A dict whose keys repeat (``{"name": "cup", "box": [..], "name":
  "plate", "box": [..]}``, kept pair by pair by the JSON reader) is read as consecutive
  groups, a new group starting where a key repeats: one object per group.
* **User keys** (:class:`~grounding.parsing.types.Keys`, ``--box-key`` / ``--point-key``
  / ``--label-key``): when a coordinate key is named, coordinates are read from the named
  key(s) only; when the label key is named, the label is read from it only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from grounding.parsing.types import Keys, Kind, RawObject, raw_object

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

NOT_LABELS = frozenset(("action", "type", "thought", "thoughts", "reason", "reasoning",
                        "explanation", "status", "id", "confidence", "language", "lang",
                        "color", "colour"))
"""Text fields that are never an object's label when they are its only text field."""

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class InvalidObject(ValueError):
    """A dict that names coordinates but whose coordinates are unusable."""


_COORD_KEY_ORDER = (*BOX_KEYS, *POINT_KEYS)
_PLAIN_NUMBER_TYPES = frozenset((int, float))

NOT_COORDINATE_WORDS = ("color", "colour", "rgb", "hsv", "hsl", "size", "shape", "dimension",
                        "resolution", "scale", "range", "version", "date", "time")
"""Words that make a key's four (or two) numbers something else than a box (a point)."""


def coord_key(obj: Mapping[str, Any]) -> str | None:
    """The known key holding coordinates, or None when the dict has none."""
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


def label_of(obj: Mapping[str, Any], key: str | None = None) -> tuple[str | None, str | None]:
    """(label, key it came from). Nested dicts prefer their English entry. ``key``: the
    user's label key, the only one read when given."""
    if key is not None:
        return (_text(obj[key]), key) if key in obj else (None, None)
    for key in LABEL_KEYS:
        if key in obj:
            text = _text(obj[key])
            if text:
                return text, key
    # Any other name-like key, e.g. `name_fr`, `label_en`, `object_name`.
    for key, value in obj.items():
        if type(key) is str and ("name" in key.lower() or "label" in key.lower()):
            text = _text(value)
            if text:
                return text, key
    # The object's only text field, whatever the prompt called it (`{"what": "cup",
    # "where": [...]}`); several, or only fields that say something else (an action,
    # a thought), and no label is guessed: --label-key names it.
    texts = [k for k, v in obj.items() if isinstance(v, str) and v.strip()
             and not (type(k) is str and k.lower() in NOT_LABELS)]
    if len(texts) == 1:
        return obj[texts[0]].strip(), texts[0]
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


class RepeatedKeys(dict):
    """A JSON object whose keys repeat: the dict json would build (last value wins), with
    every pair in order in ``pairs``."""

    pairs: list[tuple[Any, Any]]


def object_pairs(pairs: list[tuple[Any, Any]]) -> dict:
    """``object_pairs_hook`` for the JSON readers: a plain dict unless a key repeats."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated = RepeatedKeys(obj)
    repeated.pairs = pairs
    return repeated


def groups(pairs: list[tuple[Any, Any]]) -> list[dict]:
    """Consecutive groups of pairs, a new one starting where a key repeats."""
    out: list[dict] = [{}]
    for key, value in pairs:
        if key in out[-1]:
            out.append({})
        out[-1][key] = value
    return out


Found = tuple[list[RawObject], int]
"""Objects read from one dict, and how many of its coordinate values were unusable."""


def _is_plain(value: Any, n: int) -> bool:
    return (type(value) is list and len(value) == n
            and _PLAIN_NUMBER_TYPES.issuperset(map(type, value)))


def _looks_like_colour(values: list) -> bool:
    return (any(type(v) is float and 0 < v < 1 for v in values)
            and any(v > 1 for v in values))


def _shapes(key: str, value: Any) -> list[tuple[Kind, tuple[float, ...]]] | None:
    """Coordinates under a key that is not a known coordinate key, or None: a list of 4
    numbers is a box, of 2 a point, a list of those several boxes or points."""
    if type(value) is not list or not value:
        return None
    lowered = key.lower() if type(key) is str else ""
    if any(word in lowered for word in NOT_COORDINATE_WORDS):
        return None
    if _PLAIN_NUMBER_TYPES.issuperset(map(type, value)):
        if len(value) == 4 and not _looks_like_colour(value):
            return [("box", tuple(map(float, value)))]
        if len(value) == 2:
            return [("point", tuple(map(float, value)))]
        return None
    if all(_is_plain(v, 4) for v in value):
        if any(_looks_like_colour(v) for v in value):
            return None
        return [("box", tuple(map(float, v))) for v in value]
    if all(_is_plain(v, 2) for v in value):
        if len(value) == 2 and "point" not in lowered:  # [[x1, y1], [x2, y2]]: corners
            return [("box", (*map(float, value[0]), *map(float, value[1])))]
        return [("point", tuple(map(float, v))) for v in value]
    return None


def _known(key: str, value: Any) -> list[tuple[Kind, tuple[float, ...]]]:
    """Coordinates under a known (or user-named) coordinate key; raises InvalidObject."""
    if type(value) is list and value and all(
            type(v) is list and len(v) == 4 for v in value) and len(value) > 1:
        return [_one(key, v) for v in value]  # several boxes under one key
    return [_one(key, value)]


def _one(key: str, value: Any) -> tuple[Kind, tuple[float, ...]]:
    coords = tuple(numbers(value))
    if len(coords) == 4 and key not in POINT_KEYS:
        return "box", coords
    if len(coords) == 2:
        return "point", coords
    if len(coords) == 4:  # some answers put a box under `point_2d`: believe the numbers
        return "box", coords
    raise InvalidObject(f"{key} holds {len(coords)} numbers")


def objects_from_dict(obj: Mapping[str, Any], start: int = 0, keys: Keys | None = None
                      ) -> Found | None:
    """Every object one dict describes (see the module's rule), or None when it holds no
    coordinates (then the dicts inside it may)."""
    if type(obj) is RepeatedKeys:
        found: list[RawObject] = []
        invalid = 0
        any_coords = False
        for group in groups(obj.pairs):
            one = objects_from_dict(group, start, keys)
            if one is not None:
                any_coords = True
                found.extend(one[0])
                invalid += one[1]
        return (found, invalid) if any_coords else None
    if keys:
        if keys.box or keys.point:
            return _with_keys(obj, start, keys)
        return _rule(obj, start, keys.label)
    value = obj.get("bbox_2d")
    if type(value) is list and len(value) == 4:  # Qwen's own answer: the fast path
        x1, y1, x2, y2 = value
        if (type(x1) in _PLAIN_NUMBER_TYPES and type(y1) in _PLAIN_NUMBER_TYPES
                and type(x2) in _PLAIN_NUMBER_TYPES and type(y2) in _PLAIN_NUMBER_TYPES):
            coords = (float(x1), float(y1), float(x2), float(y2))
            written = obj.get("label")
            if type(written) is str and (label := written.strip()):  # label_of's usual case
                if len(obj) == 2:
                    attributes: dict[str, Any] = {}  # nothing but coordinates and label
                else:
                    attributes = dict(obj)
                    del attributes["bbox_2d"], attributes["label"]
                return [raw_object("box", coords, label, attributes, start)], 0
            return _build(obj, ["bbox_2d"], [("box", coords)], start, None), 0
    return _rule(obj, start, None)


def _rule(obj: Mapping[str, Any], start: int, label_key: str | None) -> Found | None:
    key = coord_key(obj)
    if key is not None:
        try:
            shapes = _known(key, obj[key])
        except InvalidObject:
            return [], 1
        return _build(obj, [key], shapes, start, label_key), 0
    used: list[str] = []
    shapes = []
    for k, v in obj.items():
        if type(v) is list:
            found_here = _shapes(k, v)
            if found_here:
                used.append(k)
                shapes.extend(found_here)
    if not shapes:
        return None
    if len(used) < len(obj) and _is_container(obj, used, label_key):
        return None  # a wrapper's own numbers (`wh`, `counts`) beside its objects
    return _build(obj, used, shapes, start, label_key), 0


def _is_container(obj: Mapping[str, Any], used: list[str], label_key: str | None) -> bool:
    """A dict without a label of its own that holds grounding objects (dicts with
    coordinates) beside its loose number lists."""
    held = [v for k, v in obj.items() if k not in used and (type(v) is dict or type(v) is list)]
    return any(_holds_objects(v) for v in held) and label_of(obj, label_key)[0] is None


def _holds_objects(value: Any) -> bool:
    if type(value) is dict or isinstance(value, Mapping):
        return objects_from_dict(value) is not None or any(
            _holds_objects(v) for v in value.values())
    if type(value) is list:
        return any(_holds_objects(v) for v in value if type(v) is dict or type(v) is list)
    return False


def _with_keys(obj: Mapping[str, Any], start: int, keys: Keys) -> Found | None:
    """Coordinates from the user's named keys only (box key: boxes, point key: points)."""
    present = [k for k in (keys.box, keys.point) if k and k in obj]
    if not present:
        return None
    shapes: list[tuple[Kind, tuple[float, ...]]] = []
    invalid = 0
    for k in dict.fromkeys(present):
        try:
            got = _known(k, obj[k])
        except InvalidObject:
            invalid += 1
            continue
        wanted = {kind for kind, named in (("box", keys.box), ("point", keys.point)) if named == k}
        for kind, coords in got:
            if kind in wanted:
                shapes.append((kind, coords))
            else:
                invalid += 1
    return _build(obj, present, shapes, start, keys.label), invalid


def _build(obj: Mapping[str, Any], used: list[str], shapes: list[tuple[Kind, tuple[float, ...]]],
           start: int, label_key: str | None) -> list[RawObject]:
    label, found_key = label_of(obj, label_key)
    # A nested label (`names: {"en", "zh"}`) stays in attributes: it holds the other languages.
    drop = set(used)
    if found_key is not None and isinstance(obj[found_key], str):
        drop.add(found_key)
    objects = []
    for kind, coords in shapes:
        attributes = {k: v for k, v in obj.items() if k not in drop}
        objects.append(raw_object(kind, coords, label, attributes, start))
    return objects


def object_from_dict(obj: Mapping[str, Any], start: int = 0) -> RawObject:
    """The one object a dict describes; raises InvalidObject when it describes none."""
    found = objects_from_dict(obj, start)
    if found is None:
        raise InvalidObject("no coordinate key")
    if len(found[0]) != 1:
        raise InvalidObject(f"{len(found[0])} objects")
    return found[0][0]
