"""Parsed model-frame objects -> a Result in the displayed image's frame."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from grounding.core.classes import ClassMap
from grounding.core.dedup import DEFAULT_DEDUP_IOU, dedup
from grounding.core.dialects import Dialect, get_dialect
from grounding.core.geometry import (
    Size,
    box_area,
    clip_point,
    order_box,
    point_inside,
    rescale_point,
    scale_factors,
)
from grounding.core.result import Box, Point, Result, score_at_least
from grounding.parsing import Keys, ParsedOutput


def build_result(
    parsed: ParsedOutput,
    dialect: str | Dialect,
    *,
    image_size: Size | None = None,
    input_size: Size | None = None,
    classes: ClassMap | Iterable[str] | Mapping[str, str] | None = None,
    raw: str = "",
    model: str | None = None,
    image: str | None = None,
    truncated: bool = False,
    scores: Sequence[float | None] | None = None,
    min_score: float | None = None,
    dedup_iou: float | None = DEFAULT_DEDUP_IOU,
    dedup_agnostic: bool = False,
    label: str | None = None,
) -> Result:
    """Rescale, clip, class-match and score. A label that matches a class of ``classes``
    becomes that class's name (the model's own words stay in ``model_label``), and the
    result keeps the class names in ``Result.classes``. Without ``image_size``
    coordinates stay in the model's frame (only corner order is normalised) and nothing
    is clipped. ``scores`` (one per parsed object, see grounding.core.confidence) below
    ``min_score`` drop the object (counted as ``low_score``); unscored objects are kept.
    Objects whose coordinates are not finite count as ``invalid``; with ``image_size``,
    boxes left without area by clipping count as ``no_area`` and points off the image as
    ``outside``. Last, duplicates are removed (grounding.core.dedup: same-class boxes
    overlapping above ``dedup_iou``, identical points; counted as ``duplicate``);
    ``dedup_iou`` None keeps them. ``label``: the class a request asked for alone (one
    request per class): every object is that class, whatever label the model wrote."""
    d = get_dialect(dialect)
    class_map = classes if isinstance(classes, ClassMap) or classes is None else ClassMap(classes)
    scores = list(scores) if scores is not None else [None] * len(parsed.objects)
    if image_size is not None:
        sx, sy = scale_factors(d, input_size, image_size)
        sides = float(image_size[0]), float(image_size[1])  # as a Box holds them
    invalid = parsed.invalid
    boxes: list[Box] = []
    points: list[Point] = []
    empty = False  # any box without area
    for obj, score in zip(parsed.objects, scores, strict=True):
        if not all(map(math.isfinite, obj.coords)):
            invalid += 1  # json reads NaN, Infinity and 1e999; no Box can hold them
            continue
        asked = obj.label if label is None else label
        class_id = class_map.match(asked) if class_map is not None else None
        # The label is the class when one matched (an ontology's prompt phrase, a plural,
        # a misspelling all become the class name); the model's words stay in model_label.
        name = asked if class_id is None else class_map.names[class_id]
        if obj.kind == "box":
            if image_size is None:
                bbox = order_box(obj.coords)
            else:
                bbox = _box_on_image(obj.coords, sx, sy, sides)
                # box_area(bbox) > 0.0 (bbox is ordered), to skip the no_area pass below
                empty = empty or not (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) > 0.0
            boxes.append(Box(bbox, name, class_id, score, dict(obj.attributes), obj.coords,
                             obj.label))
        else:
            xy = ((obj.coords[0], obj.coords[1]) if image_size is None
                  else clip_point(rescale_point(obj.coords, sx, sy), image_size))
            points.append(Point(xy, name, class_id, score, dict(obj.attributes),
                                obj.coords, obj.label))
    # Dropped and counted as Result.filter would, reason by reason, but on the lists
    # before the Result exists: filter copies every box, and these are not shared yet.
    dropped = {"invalid": invalid} if invalid else {}
    if min_score is not None:
        scored = score_at_least(min_score)
        boxes, points = _keep(boxes, points, scored, scored, "low_score", dropped)
    if image_size is not None:
        def inside(point: Point) -> bool:
            # Before clipping. x * (W / w') overshoots W by a rounding error for some W,
            # w' when the model writes x = w': that point is on the edge, not outside.
            assert point.model_point is not None
            xy = rescale_point(point.model_point, sx, sy)
            return point_inside(xy, image_size, tolerance=1e-6)

        if empty:
            boxes, points = _keep(boxes, points, lambda b: box_area(b.bbox) > 0.0, None,
                                  "no_area", dropped)
        if points:
            boxes, points = _keep(boxes, points, None, inside, "outside", dropped)
    result = Result(
        boxes=boxes,
        points=points,
        image=image,
        width=None if image_size is None else image_size[0],
        height=None if image_size is None else image_size[1],
        model=model,
        dialect=d.name,
        input_size=input_size,
        raw=raw,
        truncated=truncated or parsed.truncated,
        dropped=dropped,
        classes=None if class_map is None else list(class_map.names),
    )
    return dedup(result, dedup_iou, agnostic=dedup_agnostic)


def _box_on_image(coords: Sequence[float], sx: float, sy: float,
                  sides: tuple[float, float]) -> tuple[float, float, float, float]:
    """``clip_box(rescale_box(coords, sx, sy), sides)`` for finite ``coords`` and the image
    size as floats: the same numbers, without the twelve calls to min and max per box
    (build_result's hottest line)."""
    x1, y1, x2, y2 = coords
    # order_box: min(a, b) is b only when b < a; max(a, b) is b only when b > a.
    x1, x2 = (x2, x1) if x2 < x1 else (x1, x2 if x2 > x1 else x1)
    y1, y2 = (y2, y1) if y2 < y1 else (y1, y2 if y2 > y1 else y1)
    w, h = sides
    # clip_box: min(max(v, 0.0), side).
    x1, y1, x2, y2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
    x1 = 0.0 if x1 < 0.0 else (w if w < x1 else x1)
    y1 = 0.0 if y1 < 0.0 else (h if h < y1 else y1)
    x2 = 0.0 if x2 < 0.0 else (w if w < x2 else x2)
    y2 = 0.0 if y2 < 0.0 else (h if h < y2 else y2)
    return x1, y1, x2, y2


def _keep(boxes: list[Box], points: list[Point], keep_box: Callable[[Box], bool] | None,
          keep_point: Callable[[Point], bool] | None, reason: str,
          dropped: dict[str, int]) -> tuple[list[Box], list[Point]]:
    """:meth:`Result.filter` on bare lists: the kept boxes and points, in order, with the
    number removed added to ``dropped[reason]`` (no entry when none was)."""
    kept_boxes = boxes if keep_box is None else [b for b in boxes if keep_box(b)]
    kept_points = points if keep_point is None else [p for p in points if keep_point(p)]
    removed = len(boxes) - len(kept_boxes) + len(points) - len(kept_points)
    if removed:
        dropped[reason] = dropped.get(reason, 0) + removed
    return kept_boxes, kept_points


def result_from_text(
    text: str,
    dialect: str | Dialect,
    *,
    image_size: Size | None = None,
    input_size: Size | None = None,
    classes: ClassMap | Iterable[str] | Mapping[str, str] | None = None,
    keys: Keys | None = None,
    **kwargs,
) -> Result:
    """Parse a model answer and map it onto the image in one call. ``keys``: where to
    read boxes, points and labels when a prompt of one's own named them
    (grounding.parsing.Keys)."""
    d = get_dialect(dialect)
    parsed = d.parse(text, keys)
    return build_result(parsed, d, image_size=image_size, input_size=input_size,
                        classes=classes, raw=text, **kwargs)
