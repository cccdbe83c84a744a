"""Duplicate boxes and points out of one image's answer.

Grounding models write the same object twice (QwenLM/Qwen3-VL#718, #1865, #1916); tiles
that overlap see the objects of their overlap twice; a degenerating answer repeats its
last line. A box of the same class as a better one whose IoU with it is above
``iou`` is a duplicate (supervision's greedy non-max suppression does the comparing);
a box identical to a kept one always is, whatever ``iou`` says. The box kept of a group is
the best scored; unscored boxes rank below scored ones, and among equals the first
written wins, so without scores the model's first answer stands. Points collapse only
when identical (same label, same coordinates): two points close together are usually two
objects.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from grounding.core.result import Box, Point, Result

DEFAULT_DEDUP_IOU = 0.7
"""Same-class boxes overlapping more than this are one object written twice. Two real
neighbours (people in a crowd, cars in a row) rarely overlap by 0.7 IoU; boxes of one
object written twice by a VLM almost always do (they differ by a few pixels)."""


def _group(obj: Box | Point, agnostic: bool) -> Hashable:
    """What a duplicate must share with the box it duplicates: its class (the class id
    when it matched one, else its label), or nothing when ``agnostic``."""
    if agnostic:
        return None
    return ("id", obj.class_id) if obj.class_id is not None else ("label", obj.label)


def ranking(scores: Sequence[float | None]) -> np.ndarray:
    """Each object's place in the order duplicates are resolved, as a descending
    confidence (n, n-1, ..., 1): best score first, unscored after scored, the first
    written first among equals."""
    n = len(scores)
    key = [(-(s if s is not None else -np.inf), i) for i, s in enumerate(scores)]
    rank = np.empty(n, dtype=np.float64)
    for place, (_, i) in enumerate(sorted(key)):
        rank[i] = n - place
    return rank


_SWEEP_MAX = 48
"""Up to this many boxes :func:`may_have_duplicates` compares them in Python, sorted
along x (few pairs overlap there); above it, all pairs at once in numpy."""


def may_have_duplicates(bboxes: Sequence[Sequence[float]], groups: Sequence[Hashable],
                        iou: float = DEFAULT_DEDUP_IOU) -> bool:
    """False only when :func:`keep_boxes` would keep every box: no two boxes of one group
    are identical or (for ``iou`` below 1) overlap by more than ``iou``. A cheap test
    run before the exact one, for boxes as :class:`Box` holds them (finite, x_min <=
    x_max, y_min <= y_max). It is loose on purpose: a pair within a relative 1e-6 of
    ``iou`` (far above the float32 rounding of supervision's IoU) counts as
    overlapping, and so does any pair of boxes without area, so the exact comparison
    always gets the borderline cases. True for an ``iou`` of 0 or less, or NaN (the
    exact comparison decides, or refuses it)."""
    ids: dict[Hashable, int] = {}
    rows = sorted(zip([ids.setdefault(g, len(ids)) for g in groups],
                      map(tuple, bboxes), strict=True))
    if any(rows[k] == rows[k + 1] for k in range(len(rows) - 1)):
        return True  # identical boxes of one group
    if iou >= 1.0:
        return False
    if not iou > 0.0:
        return True
    # inter / union > iou  <=>  inter * (1 + iou) > iou * (area_i + area_j), loosened
    u, t = 1.0 + iou, iou * (1.0 - 1e-6)
    if len(rows) > _SWEEP_MAX:
        xyxy = np.array([box for _, box in rows], dtype=np.float64)
        x1, y1, x2, y2 = xyxy.T
        inter = np.minimum.outer(x2, x2)
        inter -= np.maximum.outer(x1, x1)
        ih = np.minimum.outer(y2, y2)
        ih -= np.maximum.outer(y1, y1)
        np.maximum(inter, 0.0, out=inter)
        np.maximum(ih, 0.0, out=ih)
        inter *= ih
        inter *= u
        area = (x2 - x1) * (y2 - y1) * t
        close = inter >= np.add.outer(area, area)
        gid = np.array([g for g, _ in rows])
        close &= gid[:, None] == gid
        np.fill_diagonal(close, False)
        return bool(close.any())
    n = len(rows)
    for k in range(n - 1):
        g, (ax1, ay1, ax2, ay2) = rows[k]
        area_a = (ax2 - ax1) * (ay2 - ay1)
        for m in range(k + 1, n):
            h, (bx1, by1, bx2, by2) = rows[m]
            if h != g:
                break
            # Sorted by x_min: once a box starts right of this one's x_max, so do all
            # after it; none overlaps it, and only boxes without area can still count.
            if bx1 >= ax2 and area_a > 0.0:
                break
            iw = min(ax2, bx2) - bx1
            ih = min(ay2, by2) - max(ay1, by1)
            inter = iw * ih * u if iw > 0.0 and ih > 0.0 else 0.0
            if inter >= t * (area_a + (bx2 - bx1) * (by2 - by1)):
                return True
    return False


def keep_boxes(xyxy: np.ndarray, groups: Sequence[Hashable], scores: Sequence[float | None],
               iou: float = DEFAULT_DEDUP_IOU) -> np.ndarray:
    """A keep mask over ``xyxy`` (n, 4): False for each box that duplicates a better
    box of its group (identical, or IoU above ``iou``; 1.0: only identical)."""
    n = len(xyxy)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    rank = ranking(scores)
    seen: dict[tuple, int] = {}
    for i in np.argsort(-rank, kind="stable"):  # identical boxes: always one object
        key = (groups[i], *xyxy[i].tolist())
        if key in seen:
            keep[i] = False
        else:
            seen[key] = i
    if iou >= 1.0:
        return keep
    import supervision as sv

    ids = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    rows = np.flatnonzero(keep)
    if len(rows) < 2:
        return keep
    predictions = np.column_stack([xyxy[rows], rank[rows],
                                   [ids[groups[i]] for i in rows]]).astype(np.float64)
    keep[rows] = sv.box_non_max_suppression(predictions, iou_threshold=iou)
    return keep


def dedup(result: Result, iou: float | None = DEFAULT_DEDUP_IOU, *,
          agnostic: bool = False) -> Result:
    """``result`` without its duplicate boxes and points, counted in
    ``dropped["duplicate"]`` (a copy, as :meth:`Result.filter` makes). ``iou`` 1.0
    removes only identical boxes; None turns deduplication off (``result`` is returned
    as it is); ``agnostic`` compares boxes across classes too."""
    boxes, points = result.boxes, result.points
    if iou is None or (len(boxes) < 2 and len(points) < 2):
        return result
    kept_boxes = kept_points = None  # None: all kept
    # The cheap test first: most answers hold no duplicate at all.
    if len(boxes) >= 2:
        groups = [_group(b, agnostic) for b in boxes]
        if may_have_duplicates([b.bbox for b in boxes], groups, iou):
            box_keep = keep_boxes(result.xyxy, groups, [b.score for b in boxes], iou)
            if not box_keep.all():
                kept_boxes = {id(b) for b, k in zip(boxes, box_keep, strict=True) if k}
    if len(points) >= 2:
        groups = [_group(p, agnostic) for p in points]
        xyxy = [(*p.point, *p.point) for p in points]
        if may_have_duplicates(xyxy, groups, 1.0):
            point_keep = keep_boxes(np.array(xyxy, dtype=np.float64), groups,
                                    [p.score for p in points], 1.0)
            if not point_keep.all():
                kept_points = {id(p) for p, k in zip(points, point_keep, strict=True) if k}
    if kept_boxes is None and kept_points is None:
        return result
    return result.filter(None if kept_boxes is None else lambda b: id(b) in kept_boxes,
                         None if kept_points is None else lambda p: id(p) in kept_points,
                         reason="duplicate")
