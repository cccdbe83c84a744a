"""Model frame <-> original (displayed) image. Pure functions on numbers.

Convention: coordinates are continuous pixel-edge coordinates; (0, 0) is the top-left
corner of the top-left pixel and (W, H) the bottom-right corner of the last pixel. A
model frame of size (w, h) covers the whole image, so a model-frame x maps to
``x * W / w`` (absolute frames) or ``x * W / norm`` (relative frames).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from grounding.core.dialects import Dialect, get_dialect
from grounding.core.errors import GeometryError

Size = tuple[int, int]
"""(width, height), the order images and records use throughout grounding."""


MAX_ASPECT_RATIO = 200


def smart_resize(width: int, height: int, *, factor: int, min_pixels: int,
                 max_pixels: int) -> Size:
    """The Qwen2/2.5/3-VL resize rule, as (width, height).

    This is qwen-vl-utils' ``smart_resize`` (the rule the Qwen cookbooks and grounding's
    backends apply before the processor; on such an image transformers' processor resize
    is the identity), written out here because importing qwen-vl-utils imports torch,
    seconds that a remote labelling client or ``grounding parse`` need not pay.
    tests/test_geometry.py proves it equal to qwen-vl-utils' own function.
    """
    if width < 1 or height < 1:
        raise GeometryError(f"image size {width}x{height} has no pixels")
    if min_pixels > max_pixels:
        raise GeometryError(f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise GeometryError(
            f"no model frame for a {width}x{height} image: the aspect ratio "
            f"{max(width, height) / min(width, height):.1f} exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if w < factor or h < factor:
        raise GeometryError(
            f"no model frame for a {width}x{height} image under max_pixels {max_pixels}"
        )
    return w, h


def model_frame(dialect: str | Dialect, width: int, height: int, *,
                min_pixels: int | None = None, max_pixels: int | None = None) -> Size:
    """The size of the image the model sees for an original of ``width`` x ``height``."""
    d = get_dialect(dialect)
    if d.fixed_size is not None:
        return d.fixed_size
    if d.factor is None:
        return width, height
    return smart_resize(
        width, height, factor=d.factor,
        min_pixels=d.min_pixels if min_pixels is None else min_pixels,
        max_pixels=d.max_pixels if max_pixels is None else max_pixels,
    )


def resolve_budget(dialect: str | Dialect, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> tuple[int | None, int | None]:
    """The pixel budget a backend runs with: the caller's values, else the dialect's
    default budget, moved so that giving only one bound never contradicts the other."""
    d = get_dialect(dialect)
    low, high = d.budget or (d.min_pixels, d.max_pixels)
    if min_pixels is None and max_pixels is not None and low is not None:
        low = min(low, max_pixels)
    if max_pixels is None and min_pixels is not None and high is not None:
        high = max(high, min_pixels)
    return (low if min_pixels is None else min_pixels,
            high if max_pixels is None else max_pixels)


def coordinate_space(dialect: str | Dialect, input_size: Size | None) -> tuple[float, float]:
    """The extent of the numbers the model writes: the input frame, or norm x norm."""
    d = get_dialect(dialect)
    if d.is_relative:
        assert d.norm is not None
        return d.norm, d.norm
    if input_size is None:
        raise GeometryError(f"dialect {d.name} writes absolute pixels: the input size is needed")
    return float(input_size[0]), float(input_size[1])


def scale_factors(dialect: str | Dialect, input_size: Size | None,
                  image_size: Size) -> tuple[float, float]:
    space_w, space_h = coordinate_space(dialect, input_size)
    return image_size[0] / space_w, image_size[1] / space_h


def order_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """Corners written in any order -> (x_min, y_min, x_max, y_max)."""
    x1, y1, x2, y2 = box
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def rescale_box(box: Sequence[float], sx: float, sy: float) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = order_box(box)
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def rescale_point(point: Sequence[float], sx: float, sy: float) -> tuple[float, float]:
    return point[0] * sx, point[1] * sy


def clip_box(box: Sequence[float], size: Size) -> tuple[float, float, float, float]:
    w, h = size
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h),
            min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def point_inside(point: Sequence[float], size: Size, tolerance: float = 0.0) -> bool:
    return (-tolerance <= point[0] <= size[0] + tolerance
            and -tolerance <= point[1] <= size[1] + tolerance)


def clip_point(point: Sequence[float], size: Size) -> tuple[float, float]:
    return min(max(point[0], 0.0), size[0]), min(max(point[1], 0.0), size[1])


def to_model_box(box: Sequence[float], dialect: str | Dialect, input_size: Size | None,
                 image_size: Size) -> tuple[float, float, float, float]:
    """The inverse mapping: an original-image box in the model's coordinate space."""
    sx, sy = scale_factors(dialect, input_size, image_size)
    x1, y1, x2, y2 = box
    return x1 / sx, y1 / sy, x2 / sx, y2 / sy
