"""One image, several requests: one per class and/or one per tile, and the one record
their answers make.

Each request is a crop (a tile, or the whole image) and a prompt (all classes, or one).
Every answer is read in its own model frame onto its crop, moved onto the whole image,
labelled with the class it asked for, and the answers are merged: pieces of an object cut
by a tile border are fused into one box, an object seen whole by two tiles is kept once,
and duplicates are removed (grounding.core.dedup).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from grounding.backends.base import Backend, Generation, Request
from grounding.core.assemble import build_result
from grounding.core.confidence import score_objects
from grounding.core.dedup import DEFAULT_DEDUP_IOU, dedup, group_key, ranking
from grounding.core.geometry import Size
from grounding.core.result import Box, Point, Result
from grounding.core.tiles import Tile, cut_sides, fuse_groups, offset_box
from grounding.pipeline.query import Ask, Query


@dataclass(frozen=True)
class Part:
    """One request about an image: ``tile`` None is the whole image."""

    ask: Ask
    tile: Tile | None = None

    def describe(self) -> str:
        where = "" if self.tile is None else "tile {},{},{},{}".format(*self.tile)
        what = "" if self.ask.phrase is None else f"class {self.ask.phrase!r}"
        return ", ".join(x for x in (where, what) if x)


UNKNOWN_BUDGET = 1280 * 28 * 28
"""The pixels a tile gets when the model's own budget is unknown (DeepSeek-VL2 without
--max-pixels: it is sent the image as it is): Qwen2/2.5-VL's default budget, about 1 MP."""


def budget(backend: Backend, size: Size) -> int:
    """The most pixels ``backend`` shows the model at once: its ``max_pixels``, else the
    frame it gives an image of ``size`` (Qwen-VL's 448x448), else UNKNOWN_BUDGET when the
    image would be sent as it is."""
    limit = getattr(backend, "max_pixels", None)
    if limit:
        return int(limit)
    width, height = backend.frame(size)
    if (width, height) == tuple(size):
        return UNKNOWN_BUDGET
    return width * height


def plan(query: Query, backend: Backend, size: Size) -> list[Part]:
    """The requests about an image of ``size``: tiles (row by row, then the whole image
    with ``with_full``) times asks (one, or one per class)."""
    asks = query.asks(backend.dialect)
    tiling = query.tiling
    if tiling is None:
        return [Part(a) for a in asks]
    tiles: list[Tile | None] = list(tiling.tiles(size, budget(backend, size)))
    if len(tiles) == 1:
        tiles = [None]
    elif tiling.with_full:
        tiles.append(None)
    return [Part(a, t) for t in tiles for a in asks]


def requests(query: Query, image: Image.Image, parts: Sequence[Part]) -> list[Request]:
    """The requests of ``parts``: each tile cropped from the upright image."""
    return [query.request(image if p.tile is None else image.crop(p.tile), p.ask.prompt)
            for p in parts]


@dataclass(frozen=True)
class Keep:
    """Which boxes are kept: ``min_score`` (None: all), duplicates over ``dedup_iou``
    (None: none removed), ``dedup_agnostic`` across classes."""

    min_score: float | None = None
    dedup_iou: float | None = DEFAULT_DEDUP_IOU
    dedup_agnostic: bool = False


def failed(name: str, image: Image.Image | None, backend: Backend, error: str) -> Result:
    return Result(image=name, width=None if image is None else image.width,
                  height=None if image is None else image.height, model=backend.model,
                  dialect=backend.dialect.name, error=error)


def assemble(name: str, image: Image.Image, query: Query, parts: Sequence[Part],
             outputs: Sequence[Generation | Exception], backend: Backend,
             keep: Keep) -> Result:
    """The record of one image from the answers to its ``parts`` (in order). A request
    that failed fails the image (nothing half-asked is recorded)."""
    for part, out in zip(parts, outputs, strict=True):
        if isinstance(out, Exception):
            where = part.describe()
            return failed(name, image, backend, f"{name}: {where + ': ' if where else ''}"
                                                f"{type(out).__name__}: {out}")
    single = len(parts) == 1 and parts[0].tile is None
    pieces = [_piece(name, image, query, part, out, backend, keep,  # type: ignore[arg-type]
                     dedup_here=single)
              for part, out in zip(parts, outputs, strict=True)]
    if single:
        result = pieces[0]
        result.prompt = parts[0].ask.prompt
        result.generation = outputs[0]
        return result.attach(image)
    result = _merge(name, image, parts, pieces, outputs, backend)  # type: ignore[arg-type]
    if any(p.tile is not None for p in parts):
        result = fuse_tiles(result)
    result = dedup(result, keep.dedup_iou, agnostic=keep.dedup_agnostic)
    result.prompt = parts[0].ask.prompt
    result.generation = list(outputs)
    return result.attach(image)


def _piece(name: str, image: Image.Image, query: Query, part: Part, out: Generation,
           backend: Backend, keep: Keep, *, dedup_here: bool) -> Result:
    """One answer read onto its crop and moved onto the whole image."""
    size = image.size if part.tile is None else (part.tile[2] - part.tile[0],
                                                 part.tile[3] - part.tile[1])
    parsed = query.parse(backend.dialect, out.text)
    scores = score_objects(out.text, parsed.objects, out.tokens, out.token_logprobs)
    result = build_result(
        parsed, backend.dialect, image_size=size, input_size=out.input_size,
        classes=query.classes, raw=out.text, model=backend.model, image=name,
        truncated=out.truncated, scores=scores, min_score=keep.min_score,
        dedup_iou=keep.dedup_iou if dedup_here else None,
        dedup_agnostic=keep.dedup_agnostic, label=part.ask.phrase)
    result.repetition = out.repetition
    if part.tile is None:
        return result
    tile = part.tile
    result.boxes = [replace(b, bbox=offset_box(b.bbox, tile),
                            attributes={**b.attributes, "tile": list(tile)})
                    for b in result.boxes]
    result.points = [replace(p, point=(p.point[0] + tile[0], p.point[1] + tile[1]),
                             attributes={**p.attributes, "tile": list(tile)})
                     for p in result.points]
    return result


def _merge(name: str, image: Image.Image, parts: Sequence[Part], pieces: Sequence[Result],
           outputs: Sequence[Generation], backend: Backend) -> Result:
    dropped: dict[str, int] = {}
    for piece in pieces:
        for reason, count in piece.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    classes = next((p.classes for p in pieces if p.classes is not None), None)
    return Result(
        boxes=[b for p in pieces for b in p.boxes],
        points=[p for piece in pieces for p in piece.points],
        image=name, width=image.width, height=image.height, model=backend.model,
        dialect=backend.dialect.name, input_size=None, raw="",
        truncated=any(p.truncated for p in pieces),
        repetition=any(p.repetition for p in pieces),
        dropped=dropped, classes=classes,
        requests=[{"prompt": part.ask.prompt, "raw": out.text,
                   "input_size": list(out.input_size),
                   "tile": None if part.tile is None else list(part.tile),
                   "class": part.ask.phrase, "truncated": piece.truncated,
                   "repetition": out.repetition}
                  for part, piece, out in zip(parts, pieces, outputs, strict=True)],
    )


def _tile_of(obj: Box | Point, size: Size) -> Tile:
    tile = obj.attributes.get("tile")
    return (0, 0, size[0], size[1]) if tile is None else tuple(tile)  # type: ignore[return-value]


def fuse_tiles(result: Result) -> Result:
    """One box per object seen by several tiles (grounding.core.tiles.fuse_groups):
    when a tile border cut one of its views, the union of the views (``attributes.tiles``
    lists them); else the best view (the others count as ``duplicate``). Pieces from
    other tiles fused into one box count as ``fused``, more than one from a tile as
    ``duplicate``. Points: one per object, the first view."""
    size = result.image_size
    assert size is not None
    boxes = result.boxes
    if len(boxes) < 2 and len(result.points) < 2:
        return result
    rank = ranking([b.score for b in boxes])
    tiles = [_tile_of(b, size) for b in boxes]
    kept: list[tuple[int, Box]] = []
    fused = duplicates = 0
    for group in fuse_groups(result.xyxy, tiles, [group_key(b) for b in boxes], size):
        best = max(group, key=lambda i: rank[i])
        if len(group) == 1:
            kept.append((best, boxes[best]))
        elif any(cut_sides(boxes[i].bbox, tiles[i], size) for i in group):
            xyxy = np.array([boxes[i].bbox for i in group])
            union = (*xyxy[:, :2].min(axis=0).tolist(), *xyxy[:, 2:].max(axis=0).tolist())
            attributes = {k: v for k, v in boxes[best].attributes.items() if k != "tile"}
            views: dict[Tile, int] = {}
            for i in group:
                views.setdefault(tiles[i], i)
            # Each tile once, in order; the whole image (--tiles-with-full) as null.
            attributes["tiles"] = [None if boxes[i].attributes.get("tile") is None
                                   else list(t) for t, i in views.items()]
            # The union was written by no one: no model coordinates to show for it.
            kept.append((min(group), replace(boxes[best], bbox=union, attributes=attributes,
                                             model_bbox=None)))
            seen_by = len({tiles[i] for i in group})
            fused += seen_by - 1  # one piece per tile; more from one tile: written twice
            duplicates += len(group) - seen_by
        else:
            kept.append((min(group), boxes[best]))
            duplicates += len(group) - 1
    kept.sort(key=lambda pair: pair[0])
    points = _fuse_points(result.points, size)
    dropped = dict(result.dropped)
    for reason, count in (("fused", fused),
                          ("duplicate", duplicates + len(result.points) - len(points))):
        if count:
            dropped[reason] = dropped.get(reason, 0) + count
    return replace(result, boxes=[b for _, b in kept], points=points, dropped=dropped)


def _fuse_points(points: list[Point], size: Size) -> list[Point]:
    """Points of one class from two tiles within a few pixels of each other, inside the
    region both tiles saw, are one point seen twice: the first is kept."""
    kept: list[Point] = []
    for p in points:
        tile = _tile_of(p, size)
        radius = max(4.0, 0.01 * float(np.hypot(tile[2] - tile[0], tile[3] - tile[1])))
        if not any(_tile_of(q, size) != tile and group_key(q) == group_key(p)
                   and np.hypot(q.point[0] - p.point[0], q.point[1] - p.point[1]) <= radius
                   for q in kept):
            kept.append(p)
    return kept
