"""Masks on the way out: a box's COCO RLE (``Box.mask``) as COCO RLE, polygons or Label
Studio brush RLE, and its area.

Polygons are the external contours of the decoded mask (OpenCV ``findContours``,
``RETR_EXTERNAL``, ``CHAIN_APPROX_SIMPLE``): holes are not kept, and a contour with fewer
than 3 points (a mask one pixel thin) is no polygon. The points are the centres of the
boundary pixels in pixel indices, the convention of OpenCV and of Ultralytics' own
``masks2segments``; a polygon therefore encloses about one pixel less in width and in
height than its mask (a 20x20 square becomes a 19x19 polygon, IoU 0.90 with the mask).
RLE is exact, and the default.

Label Studio's brush masks are not COCO RLE: they are thi.ng's ``rle-pack`` bit stream of
the RGBA image flattened row by row (what ``label_studio_converter.brush.mask2rle``
writes); :func:`brush_rle` writes the same stream without that package (which would
bring pandas, nltk and requests for one function).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grounding.core.masks import area as area  # re-exported: the exporters read these
from grounding.core.masks import compressed as _frpy
from grounding.core.masks import decode as decode

MASK_FORMATS = ("rle", "polygon")
CONTOURS = ("largest", "all")


def check_mask(rle: Any, width: int, height: int, where: str) -> dict[str, Any]:
    """The RLE as pycocotools takes it, or ValueError naming ``where`` when it is not a
    ``{"size": [height, width], "counts": ...}`` of this image's size."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if not isinstance(size, list | tuple) or len(size) != 2 or "counts" not in rle:
        raise ValueError(f"{where}: mask must be a COCO RLE {{\"size\": [height, width], "
                         f"\"counts\": ...}}, got {str(rle)[:60]}")
    if [int(size[0]), int(size[1])] != [int(height), int(width)]:
        raise ValueError(f"{where}: mask size {list(size)} (height, width) is not the "
                         f"image's {[height, width]}")
    counts = rle["counts"]
    return {"size": [int(size[0]), int(size[1])],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def coco_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """The RLE as it goes into JSON: ``counts`` a str."""
    counts = _frpy(rle)["counts"]
    return {"size": list(rle["size"]),
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def contours(mask: np.ndarray) -> list[np.ndarray]:
    """The external contours of ``mask`` with 3 or more points, each an (n, 2) float array
    of x, y pixel indices, largest area first."""
    import cv2  # opencv-python-headless, a dependency

    found, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8),
                                cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rings = [c.reshape(-1, 2).astype(float) for c in found if len(c) >= 3]
    rings.sort(key=lambda r: (-abs(float(cv2.contourArea(r.astype(np.float32)))), -len(r)))
    return rings


def polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons: every external contour as a flat ``[x1, y1, x2, y2, ...]``."""
    return [ring.reshape(-1).tolist() for ring in contours(mask)]


def joined(rings: list[np.ndarray]) -> np.ndarray:
    """Several contours as one ring, each linked to the first (the largest) by a
    zero-width bridge between their nearest points, as Ultralytics' ``convert_coco``
    joins a multi-part COCO object into one YOLO polygon (``merge_multi_segment``)."""
    if len(rings) <= 1:
        return rings[0] if rings else np.zeros((0, 2))
    base = rings[0]
    detours: dict[int, list[np.ndarray]] = {}
    for ring in rings[1:]:
        d = ((base[:, None, :] - ring[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        loop = np.concatenate([ring[j:], ring[:j + 1]])  # round the part, back to entry
        detours.setdefault(int(i), []).append(loop)
    out: list[np.ndarray] = []
    for i, point in enumerate(base):
        out.append(point[None])
        for loop in detours.get(i, []):
            out += [loop, point[None]]
    return np.concatenate(out)


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a (height, width) bool mask: the RGBA image (255 in every
    channel on the mask, 0 off it) flattened row by row, packed as thi.ng's rle-pack
    stream with word size 8 and run-length sizes 3, 4, 8, 16 bits, as
    ``label_studio_converter.brush.mask2rle`` writes it: 32 bits of value count, 5 of
    word size - 1, 4 of each run-length size - 1, then per run ``1``, the 2-bit index of
    the run-length size, length - 1, the 8-bit value; padded to whole bytes."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    n = flat.size
    bits = [f"{4 * n:032b}", f"{8 - 1:05b}", "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))]
    if n:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [n]])) * 4  # 4 channels per pixel
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            value = "11111111" if flat[start] else "00000000"
            while length > 0:  # every run is >= 4 values: always a series
                take = min(length, 2**16)
                if take <= 8:
                    bits.append(f"100{take - 1:03b}{value}")
                elif take <= 16:
                    bits.append(f"101{take - 1:04b}{value}")
                elif take <= 256:
                    bits.append(f"110{take - 1:08b}{value}")
                else:
                    bits.append(f"111{take - 1:016b}{value}")
                length -= take
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return list(int(text, 2).to_bytes(len(text) // 8, "big"))
