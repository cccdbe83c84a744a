"""The image a result belongs to, and crops of it around a box with some context: what
verification and questions about single detections show the model."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from grounding.core.geometry import MAX_ASPECT_RATIO
from grounding.core.result import Box, Result
from grounding.io.images import ImageSource, load_image, upright

CropBox = tuple[int, int, int, int]
"""(x0, y0, x1, y1): where a crop sits in the image, in whole pixels."""

DEFAULT_CONTEXT = 0.25
"""How much of a box's width (height) a crop adds on each side."""
DEFAULT_MIN_SIDE = 28
"""One Qwen2/2.5-VL merge unit: a smaller crop is upscaled by the model frame anyway."""


def _span(lo: float, hi: float, context: float, min_side: int, limit: int) -> tuple[int, int]:
    """One axis: grow by ``context`` of the length on each side, clip to [0, limit], cover
    whole pixels, then widen to ``min_side`` around the middle, shifted inside the image."""
    lo, hi = min(lo, hi), max(lo, hi)
    grow = context * (hi - lo)
    a = max(0, math.floor(lo - grow + 1e-9))
    b = min(limit, math.ceil(hi + grow - 1e-9))
    if b <= a:  # a degenerate box: at least the pixel it touches
        a = min(max(0, math.floor(lo)), limit - 1)
        b = a + 1
    return _widen(a, b, min(min_side, limit), limit)


def _widen(a: int, b: int, want: int, limit: int) -> tuple[int, int]:
    """[a, b) widened to ``want`` pixels around its middle, shifted inside [0, limit]; when
    the image is narrower than ``want`` the span is centred on it and reaches beyond."""
    if b - a >= want:
        return a, b
    if want > limit:
        a = math.floor((limit - want) / 2)
        return a, a + want
    a = math.floor((a + b) / 2 - want / 2)
    a = min(max(0, a), limit - want)
    return a, a + want


def crop_with_context(image: Image.Image, box: Box | Sequence[float],
                      context: float = DEFAULT_CONTEXT,
                      min_side: int = DEFAULT_MIN_SIDE) -> tuple[Image.Image, CropBox]:
    """The part of ``image`` around ``box`` and where it is: ``(crop, (x0, y0, x1, y1))``.

    ``box`` is ``[x_min, y_min, x_max, y_max]`` in pixel-edge coordinates of the image as
    displayed (a :class:`Box` or four numbers). It is grown by ``context`` times its width
    (height) on the left and right (top and bottom), clipped to the image and widened to
    whole pixels; a side shorter than ``min_side`` pixels is widened to it around the
    box's middle (never beyond the image). The EXIF orientation of ``image`` is applied
    first, so a photo opened with PIL directly is cut where the box is on screen.

    A model refuses an image whose long side is over 200 times its short side (Qwen's
    ``smart_resize``), so the short side of a crop of a thin box is widened until the
    ratio is at most that; in an image too thin for it (a 6000x28 strip) the crop reaches
    beyond the image, padded with black, and its box has coordinates outside the image
    (crop pixel (u, v) is always image pixel (x0 + u, y0 + v)).
    """
    if context < 0 or min_side < 1:
        raise ValueError("context must be >= 0 and min_side >= 1")
    bbox = box.bbox if isinstance(box, Box) else tuple(float(v) for v in box)
    if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"expected a box [x_min, y_min, x_max, y_max], got {bbox!r}")
    image = upright(image)
    w, h = image.size
    x0, x1 = _span(bbox[0], bbox[2], context, min_side, w)
    y0, y1 = _span(bbox[1], bbox[3], context, min_side, h)
    if x1 - x0 > MAX_ASPECT_RATIO * (y1 - y0):
        y0, y1 = _widen(y0, y1, math.ceil((x1 - x0) / MAX_ASPECT_RATIO), h)
    elif y1 - y0 > MAX_ASPECT_RATIO * (x1 - x0):
        x0, x1 = _widen(x0, x1, math.ceil((y1 - y0) / MAX_ASPECT_RATIO), w)
    return image.crop((x0, y0, x1, y1)), (x0, y0, x1, y1)


# -------------------------------------------------------------------- yes / no reading


def image_for(result: Result, image: ImageSource | None) -> Image.Image:
    """The upright RGB image of ``result``: ``image`` if given, else the one attached to
    the result, else its ``image`` path; its size must be the result's."""
    if image is None:
        image = result.attached_image
    if image is None:
        if not result.image:
            raise ValueError("no image: pass the image the result was made from")
        image = result.image
    picture = load_image(image)
    if result.image_size is not None and picture.size != result.image_size:
        raise ValueError(f"image is {picture.width}x{picture.height} but the result is for "
                         f"{result.width}x{result.height}")
    return picture
