"""Instance masks as COCO RLE, and the checks a box's mask must pass. Pure functions.

A mask is a boolean array ``(height, width)`` in the displayed (EXIF-upright) image's
pixel frame, the frame of the boxes. On the record it is pycocotools' compressed RLE,
``{"size": [height, width], "counts": "<str>"}`` (``counts`` as text so that the record
is JSON), exactly what COCO's ``segmentation`` field and ``iouType="segm"`` take.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["OUTSIDE_BOX_SHARE", "area", "decode", "encode", "mask_check"]

OUTSIDE_BOX_SHARE = 0.5
"""A mask with more than this share of its pixels outside its box is flagged
``"outside_box"``: a box-prompted segmenter that puts most of the mask elsewhere has
segmented something other than what the box holds."""

Rle = dict[str, Any]


def encode(mask: np.ndarray) -> Rle:
    """COCO compressed RLE of a boolean ``(height, width)`` mask, ``counts`` as str."""
    from pycocotools import mask as mask_utils

    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask is 2-D (height, width), got shape {array.shape}")
    rle = mask_utils.encode(np.asfortranarray(array.astype(bool, copy=False), dtype=np.uint8))
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


@contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools 2.0 warns on numpy 2 about its own ``__array__`` (copy keyword) at
    every decode; the result is right, and the warning is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept",
                                category=DeprecationWarning)
        yield


def compressed(rle: Mapping[str, Any]) -> Rle:
    """pycocotools' form of ``rle``: compressed counts as bytes (uncompressed lists, as
    COCO's ``iscrowd`` annotations hold, are compressed first)."""
    from pycocotools import mask as mask_utils

    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts},
                                      height, width)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [height, width], "counts": counts}


def decode(rle: Mapping[str, Any]) -> np.ndarray:
    """The boolean ``(height, width)`` mask of a COCO RLE (compressed str/bytes counts, or
    uncompressed list counts)."""
    from pycocotools import mask as mask_utils

    with _quiet():
        return mask_utils.decode(compressed(rle)).astype(bool)


def area(rle: Mapping[str, Any]) -> int:
    """The number of pixels in the mask (without decoding it)."""
    from pycocotools import mask as mask_utils

    with _quiet():
        return int(mask_utils.area(compressed(rle)))


def _box_pixels(bbox: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The pixel rows/columns a box touches, clipped to the image: (x0, y0, x1, y1),
    half-open. Edges are continuous pixel-edge coordinates (grounding.core.geometry), so
    a pixel any part of which lies in the box counts as inside it."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    left = min(max(math.floor(min(x1, x2)), 0), width)
    right = min(max(math.ceil(max(x1, x2)), 0), width)
    top = min(max(math.floor(min(y1, y2)), 0), height)
    bottom = min(max(math.ceil(max(y1, y2)), 0), height)
    return left, top, right, bottom


def mask_check(mask: np.ndarray | Mapping[str, Any], bbox: Sequence[float]) -> str | None:
    """Why the mask of box ``bbox`` (x1, y1, x2, y2 in the mask's pixel frame) is not to
    be trusted, or None.

    ``"empty"``: no pixel set. ``"outside_box"``: more than :data:`OUTSIDE_BOX_SHARE` of
    its pixels lie outside the box (pixels the box touches, even partly, count as inside).
    """
    array = decode(mask) if isinstance(mask, Mapping) else np.asarray(mask, dtype=bool)
    if array.ndim != 2:
        raise ValueError(f"a mask is 2-D (height, width), got shape {array.shape}")
    total = int(np.count_nonzero(array))
    if total == 0:
        return "empty"
    left, top, right, bottom = _box_pixels(bbox, *array.shape)
    inside = int(np.count_nonzero(array[top:bottom, left:right]))
    if total - inside > OUTSIDE_BOX_SHARE * total:
        return "outside_box"
    return None
