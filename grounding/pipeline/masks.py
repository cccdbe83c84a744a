"""Masks from boxes: every box of a result given to a box-prompted segmenter (SAM 2
through transformers, grounding.backends.segment) on the upright image it was found in.

The boxes are exact in the displayed frame, which is what a box prompt needs; the masks
come back in the same frame, as COCO RLE on each box (``Box.mask``), with the
segmenter's own score (``attributes.mask_score``) and the mask's area
(``attributes.mask_area``). A mask that is empty or lies mostly outside its box is
flagged (``attributes.mask_problem``), never silently kept as if it were good.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from grounding.core.result import Result


class Segmenter(Protocol):
    model: str

    def segment(self, images: list[Any], boxes: list[np.ndarray]) -> list[list[Any]]:
        """Per image, per box (xyxy in that image's pixels): a MaskResult with ``rle``,
        ``score``, ``area`` and ``problem``."""
        ...


def with_masks(results: Iterable[Result], segmenter: Segmenter, *,
               batch_size: int = 4) -> Iterator[Result]:
    """``results`` in order, each box of each with its mask. The images of
    ``batch_size`` results go to the segmenter together (one image embedding each, all
    boxes of an image in one pass); a result without boxes, failed, or without its
    image attached passes through untouched. Masks are held only for the results of
    one batch."""
    source = iter(results)
    while chunk := list(itertools.islice(source, batch_size)):
        yield from _segment(chunk, segmenter)


def _segment(chunk: Sequence[Result], segmenter: Segmenter) -> list[Result]:
    todo = [i for i, r in enumerate(chunk)
            if r.boxes and r.error is None and r.attached_image is not None]
    if not todo:
        return list(chunk)
    images = [chunk[i].attached_image for i in todo]
    boxes = [chunk[i].xyxy for i in todo]
    try:
        masks = segmenter.segment(images, boxes)
    except Exception as exc:  # one bad batch: each image on its own, errors recorded
        if len(todo) == 1:
            out = list(chunk)
            failed = out[todo[0]].copy()
            failed.error = f"{failed.image}: masks: {type(exc).__name__}: {exc}"
            out[todo[0]] = failed
            return out
        out = list(chunk)
        for i in todo:
            out[i] = _segment([chunk[i]], segmenter)[0]
        return out
    out = list(chunk)
    for i, found in zip(todo, masks, strict=True):
        result = chunk[i].copy()
        for box, mask in zip(result.boxes, found, strict=True):
            box.mask = mask.rle
            box.attributes["mask_score"] = float(mask.score)
            box.attributes["mask_area"] = int(mask.area)
            if mask.problem:
                box.attributes["mask_problem"] = mask.problem
        out[i] = result
    return out
