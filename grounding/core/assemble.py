"""Parsed model-frame objects -> a Result in the displayed image's frame."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from grounding.core.classes import ClassMap
from grounding.core.dialects import Dialect, get_dialect
from grounding.core.geometry import (
    Size,
    box_area,
    clip_box,
    clip_point,
    order_box,
    point_inside,
    rescale_box,
    rescale_point,
    scale_factors,
)
from grounding.core.result import Box, Point, Result
from grounding.parsing import ParsedOutput


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
) -> Result:
    """Rescale, clip, class-match and score. Without ``image_size`` coordinates stay in the
    model's frame (only corner order is normalised) and nothing is clipped. ``scores``
    (one per parsed object, see grounding.core.confidence) below ``min_score`` drop the object
    (counted as ``low_score``); unscored objects are kept."""
    d = get_dialect(dialect)
    class_map = classes if isinstance(classes, ClassMap) or classes is None else ClassMap(classes)
    dropped = {"no_area": 0, "outside": 0, "low_score": 0, "invalid": parsed.invalid}
    scores = list(scores) if scores is not None else [None] * len(parsed.objects)
    if image_size is not None:
        sx, sy = scale_factors(d, input_size, image_size)
    boxes: list[Box] = []
    points: list[Point] = []
    for obj, score in zip(parsed.objects, scores, strict=True):
        if min_score is not None and score is not None and score < min_score:
            dropped["low_score"] += 1
            continue
        class_id = class_map.match(obj.label) if class_map is not None else None
        if obj.kind == "box":
            if image_size is None:
                bbox = order_box(obj.coords)
            else:
                bbox = clip_box(rescale_box(obj.coords, sx, sy), image_size)
                if box_area(bbox) <= 0.0:
                    dropped["no_area"] += 1
                    continue
            boxes.append(Box(bbox, obj.label, class_id, score, dict(obj.attributes), obj.coords))
        else:
            if image_size is None:
                xy = (obj.coords[0], obj.coords[1])
            else:
                xy = rescale_point(obj.coords, sx, sy)
                # x * (W / w') overshoots W by a rounding error for some W, w' when the
                # model writes x = w': that point is on the edge, not outside.
                if not point_inside(xy, image_size, tolerance=1e-6):
                    dropped["outside"] += 1
                    continue
                xy = clip_point(xy, image_size)
            points.append(Point(xy, obj.label, class_id, score, dict(obj.attributes),
                                obj.coords))
    return Result(
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
        dropped={k: v for k, v in dropped.items() if v},
    )


def result_from_text(
    text: str,
    dialect: str | Dialect,
    *,
    image_size: Size | None = None,
    input_size: Size | None = None,
    classes: ClassMap | Iterable[str] | Mapping[str, str] | None = None,
    **kwargs,
) -> Result:
    """Parse a model answer and map it onto the image in one call."""
    d = get_dialect(dialect)
    return build_result(d.parse(text), d, image_size=image_size, input_size=input_size,
                        classes=classes, raw=text, **kwargs)
