"""Tiles: cutting a large image into overlapping crops, and fusing what they saw.

A VLM sees an image shrunk to its pixel budget, so an object of 20 pixels in a 4032x3024
photo is a few pixels in the model frame and is missed (QwenLM/Qwen3-VL#773). Asking
about overlapping tiles, each shrunk far less, finds it; the boxes are then moved back
onto the whole image, the pieces of an object cut by a tile border are fused into one
box, and an object seen whole by two overlapping tiles is kept once.

Pure geometry: a tile is ``(x_min, y_min, x_max, y_max)`` in integer pixels of the
displayed (upright) image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from grounding.core.geometry import Size

Tile = tuple[int, int, int, int]

DEFAULT_TILE_OVERLAP = 0.2
"""Each tile shares this fraction of its width (height) with its neighbour: an object up
to that size is seen whole by at least one tile, and a larger one is cut in pieces that
overlap enough to be fused."""

MAX_GRID = 16
"""The most columns (rows) ``auto`` picks: 256 requests per image is already a lot."""

EDGE = 1.0
"""A box whose side is within this many pixels of a tile's inner edge was cut by it."""

SAME_OBJECT = 0.5
"""Two pieces from two tiles are one object when, inside the region both tiles saw, their
boxes overlap by at least this IoU."""


@dataclass(frozen=True)
class Tiling:
    """How to tile: ``grid`` "auto" or (cols, rows); ``overlap`` as a fraction of a tile;
    ``with_full``: also ask about the whole image (large objects that span tiles)."""

    grid: str | tuple[int, int] = "auto"
    overlap: float = DEFAULT_TILE_OVERLAP
    with_full: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), not {self.overlap}")
        if self.grid != "auto":
            cols, rows = self.grid  # type: ignore[misc]
            if not (1 <= cols <= 64 and 1 <= rows <= 64):
                raise ValueError(f"a tile grid is 1x1 to 64x64, not {cols}x{rows}")

    @classmethod
    def parse(cls, text: str, overlap: float = DEFAULT_TILE_OVERLAP,
              with_full: bool = False) -> Tiling:
        """``auto`` or ``COLSxROWS`` (``3x2``); ValueError with one line otherwise."""
        text = text.strip().lower()
        if text == "auto":
            return cls("auto", overlap, with_full)
        match = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", text)
        if not match:
            raise ValueError(f"tiles take auto or COLSxROWS (e.g. 3x2), not {text!r}")
        return cls((int(match[1]), int(match[2])), overlap, with_full)

    @property
    def spec(self) -> str:
        """As run.json records it and ``parse`` reads it."""
        return "auto" if self.grid == "auto" else f"{self.grid[0]}x{self.grid[1]}"

    def tiles(self, size: Size, budget: int | None) -> list[Tile]:
        """The tiles of an image of ``size`` (width, height), row by row; ``budget`` (the
        most pixels the model sees at once) sizes the ``auto`` grid."""
        cols, rows = (auto_grid(size, budget, self.overlap) if self.grid == "auto"
                      else self.grid)  # type: ignore[misc]
        return grid_tiles(size, cols, rows, self.overlap)


def _spans(length: int, count: int, overlap: float) -> list[tuple[int, int]]:
    """``count`` equal spans covering 0..length, each sharing at least ``overlap`` of
    its length with the next, the first at 0 and the last ending at ``length``."""
    count = max(1, min(count, length))
    if count == 1:
        return [(0, length)]
    span = min(length, math.ceil(length / (count - (count - 1) * overlap)))
    step = (length - span) / (count - 1)
    return [(round(i * step), round(i * step) + span) for i in range(count)]


def grid_tiles(size: Size, cols: int, rows: int, overlap: float = DEFAULT_TILE_OVERLAP
               ) -> list[Tile]:
    """``cols`` x ``rows`` tiles of equal size covering the image, row by row."""
    width, height = size
    return [(x0, y0, x1, y1) for y0, y1 in _spans(height, rows, overlap)
            for x0, x1 in _spans(width, cols, overlap)]


def auto_grid(size: Size, budget: int | None, overlap: float = DEFAULT_TILE_OVERLAP
              ) -> tuple[int, int]:
    """The fewest tiles whose each fits ``budget`` pixels, so the model sees each at
    (close to) full resolution, among tiles no more elongated than 2:1 when any such
    grid fits; among as many tiles, the most square ones. An image within the budget
    is one tile; None (no budget known) is one tile too."""
    width, height = size
    if not budget or width * height <= budget:
        return 1, 1
    fits: list[tuple[bool, int, float, int, int]] = []
    for cols in range(1, MAX_GRID + 1):
        for rows in range(1, MAX_GRID + 1):
            tw = width / (cols - (cols - 1) * overlap)
            th = height / (rows - (rows - 1) * overlap)
            if tw * th <= budget:
                skew = abs(math.log(tw / th))
                # Tiles no more elongated than 2:1 first: a strip is a poor model frame.
                fits.append((skew > math.log(2), cols * rows, skew, cols, rows))
                break  # more rows only adds tiles
    if not fits:
        return MAX_GRID, MAX_GRID
    best = min(fits)
    return best[3], best[4]


def offset_box(box: Sequence[float], tile: Tile) -> tuple[float, float, float, float]:
    """A box in a tile's pixels, in the whole image's."""
    return (box[0] + tile[0], box[1] + tile[1], box[2] + tile[0], box[3] + tile[1])


def cut_sides(box: Sequence[float], tile: Tile, size: Size) -> bool:
    """Whether ``box`` (whole-image pixels) touches a side of ``tile`` that is not a side
    of the image: the tile's border may have cut the object."""
    width, height = size
    return ((tile[0] > 0 and box[0] <= tile[0] + EDGE)
            or (tile[1] > 0 and box[1] <= tile[1] + EDGE)
            or (tile[2] < width and box[2] >= tile[2] - EDGE)
            or (tile[3] < height and box[3] >= tile[3] - EDGE))


def _clip(box: np.ndarray, region: Sequence[float]) -> np.ndarray:
    return np.array([max(box[0], region[0]), max(box[1], region[1]),
                     min(box[2], region[2]), min(box[3], region[3])])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def fuse_groups(xyxy: np.ndarray, tiles: Sequence[Tile], groups: Sequence[Hashable],
                size: Size) -> list[list[int]]:
    """The boxes (whole-image pixels, one tile each) that are one object seen by several
    tiles, as lists of indices (singletons included, in first-index order).

    Two boxes of one group (class) from two different tiles are the same object when,
    clipped to the region both tiles saw, they overlap by at least SAME_OBJECT IoU: a
    piece cut by a border and the rest of it, or the object seen whole twice."""
    n = len(xyxy)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            a, b = tiles[i], tiles[j]
            if a == b or groups[i] != groups[j]:
                continue
            shared = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
            if shared[0] >= shared[2] or shared[1] >= shared[3]:
                continue
            if _iou(_clip(xyxy[i], shared), _clip(xyxy[j], shared)) >= SAME_OBJECT:
                parent[root(j)] = root(i)
    out: dict[int, list[int]] = {}
    for i in range(n):
        out.setdefault(root(i), []).append(i)
    return list(out.values())
