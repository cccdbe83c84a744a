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
from itertools import islice
from operator import eq

import numpy as np

from grounding.core.result import Box, Point, Result

DEFAULT_DEDUP_IOU = 0.7
"""Same-class boxes overlapping more than this are one object written twice. Two real
neighbours (people in a crowd, cars in a row) rarely overlap by 0.7 IoU; boxes of one
object written twice by a VLM almost always do (they differ by a few pixels)."""


def group_key(obj: Box | Point) -> Hashable:
    """What a duplicate must share with the box it duplicates: its class (the class id
    when it matched one, else its label). A label (str or None) is its own key, cheap to
    hash; anything else is tagged, so no label can equal a class id."""
    if obj.class_id is not None:
        return ("id", obj.class_id)
    label = obj.label
    return label if label is None or isinstance(label, str) else ("label", label)


def _groups(objects: Sequence[Box] | Sequence[Point], agnostic: bool) -> list[Hashable]:
    """:func:`group_key` per object, or the same key for all when ``agnostic``."""
    return [None] * len(objects) if agnostic else [group_key(o) for o in objects]


def _boxes_by_group(boxes: Sequence[Box], agnostic: bool
                    ) -> dict[Hashable, list[tuple[float, float, float, float]]]:
    """The bboxes of ``boxes`` by :func:`_groups`' key, in one pass (:func:`group_key` written
    out: this runs for every answer with two boxes or more)."""
    if agnostic:
        return {None: [b.bbox for b in boxes]}
    by_group: dict[Hashable, list[tuple[float, float, float, float]]] = {}
    for b in boxes:
        label = b.label
        key = (("id", b.class_id) if b.class_id is not None
               else label if label is None or isinstance(label, str) else ("label", label))
        same = by_group.get(key)
        if same is None:
            by_group[key] = [b.bbox]
        else:
            same.append(b.bbox)
    return by_group


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
"""Up to this many boxes in a group :func:`may_have_duplicates` compares them in Python,
sorted along x (few pairs overlap there); above it, all pairs at once in numpy."""


def may_have_duplicates(bboxes: Sequence[tuple[float, float, float, float]],
                        groups: Sequence[Hashable], iou: float = DEFAULT_DEDUP_IOU) -> bool:
    """False only when :func:`keep_boxes` would keep every box: no two boxes of one group
    are identical or (for ``iou`` below 1) overlap by more than ``iou``. A cheap test
    run before the exact one, for boxes as :class:`Box` holds them (4-tuples, finite,
    x_min <= x_max, y_min <= y_max). It is loose on purpose: a pair within a relative
    1e-6 of ``iou`` (far above the float32 rounding of supervision's IoU) counts as
    overlapping, so the exact comparison always gets the borderline cases. Boxes
    without area never overlap (supervision's IoU is 0 for them), only when identical.
    True for an ``iou`` of 0 or less, or NaN (the exact comparison decides, or refuses
    it)."""
    if not iou > 0.0:
        return True
    by_group: dict[Hashable, list[tuple[float, float, float, float]]] = {}
    for group, box in zip(groups, bboxes, strict=True):
        by_group.setdefault(group, []).append(box)
    return _grouped_may_have_duplicates(by_group, len(bboxes), iou)


def _grouped_may_have_duplicates(by_group: dict[Hashable, list[tuple[float, ...]]],
                                 count: int, iou: float) -> bool:
    """:func:`may_have_duplicates` on the boxes of each group, ``count`` boxes in all, for
    an ``iou`` above 0; sorts the lists in place."""
    if len(by_group) == count:
        return False  # one box per group: nothing to compare
    # inter / union > iou  <=>  inter * (1 + iou) > iou * (area_a + area_b), loosened
    u, t = 1.0 + iou, iou * (1.0 - 1e-6)
    for boxes in by_group.values():
        if len(boxes) < 2:
            continue
        boxes.sort()  # by x_min first; identical boxes end up side by side
        if iou >= 1.0:
            if any(map(eq, boxes, islice(boxes, 1, None))):
                return True
            continue
        if len(boxes) > _SWEEP_MAX:
            if _overlap_matrix(np.array(boxes, dtype=np.float64), u, t):
                return True
            continue
        n = len(boxes)
        for k in range(n - 1):
            a = boxes[k]
            ax1, ay1, ax2, ay2 = a
            width_a = ax2 - ax1
            # IoU <= (x-overlap) / width_a, and the x-overlap of b is at most
            # ax2 - bx1: a box starting this close to a's right edge is no duplicate.
            reach = t * width_a
            m = k + 1
            while m < n:  # usually a step or two: no iterator made per box
                b = boxes[m]
                m += 1
                if ax2 - b[0] <= reach:
                    if b == a:
                        return True  # identical, without width
                    break  # sorted by x_min: so are all boxes after this one
                bx1, by1, bx2, by2 = b
                if by1 >= ay2 or by2 <= ay1:
                    if b == a:
                        return True  # identical, without height
                    continue  # above or below a: no overlap
                iw = (bx2 if bx2 < ax2 else ax2) - bx1
                ih = (by2 if by2 < ay2 else ay2) - (by1 if by1 > ay1 else ay1)
                # identical boxes with area pass this test too
                if iw * ih * u >= t * (width_a * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1)):
                    return True
    return False


def _overlap_matrix(xyxy: np.ndarray, u: float, t: float) -> bool:
    """:func:`may_have_duplicates`' test on every pair of ``xyxy`` (one group) at once;
    looser still: two boxes without area always count."""
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
    np.fill_diagonal(close, False)
    return bool(close.any())


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
    # The cheap test first: most answers hold no duplicate at all. (An iou of 0 or less,
    # or NaN, goes straight to the exact comparison, which decides or refuses it.)
    if len(boxes) >= 2 and (not iou > 0.0 or _grouped_may_have_duplicates(
            _boxes_by_group(boxes, agnostic), len(boxes), iou)):
        groups = _groups(boxes, agnostic)
        box_keep = keep_boxes(result.xyxy, groups, [b.score for b in boxes], iou)
        if not box_keep.all():
            kept_boxes = {id(b) for b, k in zip(boxes, box_keep, strict=True) if k}
    if len(points) >= 2:
        groups = _groups(points, agnostic)
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
