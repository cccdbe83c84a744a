"""Label Studio pre-annotations: ``out/tasks.json`` and the matching ``out/label_config.xml``.

Each task is ``{"data": {"image": URL}, "predictions": [...]}`` in Label Studio's
pre-annotation format (labelstud.io/guide/predictions): rectangles and keypoints in
percent of the displayed image, with ``original_width``/``original_height``. The
``from_name``/``to_name`` values are the tag names of ``label_config.xml``; paste that
config into the project, or edit both together.

URL: ``url_prefix`` + the image's path relative to the images root, percent-encoded (a
``#`` or ``?`` in a file name would otherwise cut the URL); a prefix that does not end in
``/`` or ``=`` gets a ``/``. The default prefix is Label Studio's local-files serving
(started with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/some/dir``), whose URLs are
``/data/local-files/?d=PATH`` with PATH relative to that document root: so the default
works when the document root is the images root, and with the document root ``/data``
and the images under ``/data/photos`` the prefix is ``/data/local-files/?d=photos/``.
Images served over HTTP take that server's address: ``http://host:8081/photos/``. An
image on object storage keeps its URI (``s3://bucket/a.jpg``), which Label Studio serves
from a connected cloud storage.

A box with a mask (``--masks``) keeps its rectangle and gets its mask beside it: by
default (``mask_format="rle"``) a ``brushlabels`` region holding Label Studio's own brush
RLE (``{"format": "rle", "rle": [bytes]}``, not COCO RLE: see
``formats.segmentation.brush_rle``), or with ``mask_format="polygon"`` one
``polygonlabels`` region per external contour, points in percent. ``label_config.xml``
then declares the ``BrushLabels`` or ``PolygonLabels`` tag those regions name.

Each task's data also holds the run's key of its image (``grounding_image``): Label
Studio keeps data fields it does not show, and ``grounding import-corrections`` maps an
annotated task back to its image by it. A record a person reviewed (``"reviewed": true``,
from ``corrections.jsonl``) goes out with its boxes as the task's ``annotations`` (what
Label Studio holds as human labels, the task counted as labelled) instead of
``predictions``, and ``grounding_reviewed: true`` in its data.

Images are not copied. Label Studio shows an image the way the browser decodes it, and
browsers apply EXIF orientation by default (CSS ``image-orientation: from-image``), so
the displayed frame the records use is the one annotators see; Label Studio users report
EXIF-rotated photos displayed upright (HumanSignal/label-studio-ml-backend#535). This is
the one exporter that relies on the reader applying EXIF; it has not been checked
against a running Label Studio here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from grounding.formats import segmentation
from grounding.formats.common import (
    ExportExists,
    ExportStats,
    check_class_names,
    iter_items,
    select,
)

IMAGE_TAG, RECT_TAG, POINT_TAG = "image", "label", "keypoint"
BRUSH_TAG, POLYGON_TAG = "mask", "polygon"
POINT_WIDTH = 0.5
"""Keypoint size in percent of the image width, as Label Studio stores it."""


KEY_FIELD, REVIEWED_FIELD = "grounding_image", "grounding_reviewed"
"""Task data fields: the run's key of the image, and whether a person reviewed it."""

LOCAL_FILES_PREFIX = "/data/local-files/?d="
"""Label Studio's URL for a file under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""


def image_url(relative: str, url_prefix: str = LOCAL_FILES_PREFIX) -> str:
    """The task URL of the image at ``relative`` (POSIX, under the images root)."""
    if url_prefix and not url_prefix.endswith(("/", "=")):
        url_prefix += "/"
    return url_prefix + quote(relative, safe="/")


def export_labelstudio(records: Iterable[dict[str, Any]], images_root: Path | str,
                       class_names: list[str], out: Path, *, min_score: float | None = None,
                       url_prefix: str = LOCAL_FILES_PREFIX,
                       overwrite: bool = False, mask_format: str = "rle") -> ExportStats:
    """Write ``out/tasks.json`` (streamed) and ``out/label_config.xml``; the image URLs
    are ``url_prefix`` + the path under ``images_root`` (see the module docstring). An
    ``out`` that already holds either file is refused (:class:`ExportExists`) unless
    ``overwrite``. ``mask_format``: a box's mask as a brush region (``"rle"``) or
    polygon regions (``"polygon"``), beside its rectangle."""
    if mask_format not in segmentation.MASK_FORMATS:
        raise ValueError("mask_format must be one of "
                         f"{', '.join(segmentation.MASK_FORMATS)}, got {mask_format!r}")
    names = check_class_names(class_names)
    any_mask = any_point = False
    out = Path(out)  # images_root: a Path, or a str URI (see iter_items)
    for existing in (out / "tasks.json", out / "label_config.xml"):
        if not overwrite and os.path.lexists(existing):
            raise ExportExists(existing, "exists (a previous export?)")
    out.mkdir(parents=True, exist_ok=True)
    stats = ExportStats()
    path = out / "tasks.json"
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        f.write("[")
        for item in iter_items(records, images_root, stats):
            kept = select(item, len(names), min_score, stats)
            w, h, n = item.width, item.height, stats.images
            result: list[dict[str, Any]] = []
            rects = zip(kept.boxes, kept.xywh_percent.tolist(), strict=True)
            for i, (b, (x, y, bw, bh)) in enumerate(rects):
                value = {"x": x, "y": y, "width": bw, "height": bh,
                         "rotation": 0, "rectanglelabels": [names[b.class_id]]}
                result.append(_result(f"{n}-b{i}", "rectanglelabels", RECT_TAG, w, h, value,
                                      b.score))
                if b.mask is not None:
                    any_mask = True
                    result += _mask_results(f"{n}-m{i}", b, names[b.class_id], item,
                                            mask_format, stats)
            keys = zip(kept.points, kept.points_percent.tolist(), strict=True)
            for i, (p, (x, y)) in enumerate(keys):
                any_point = True
                value = {"x": x, "y": y, "width": POINT_WIDTH,
                         "keypointlabels": [names[p.class_id]]}
                result.append(_result(f"{n}-p{i}", "keypointlabels", POINT_TAG, w, h, value,
                                      p.score))
            scores = [r["score"] for r in result if "score" in r]
            url = item.source if isinstance(item.source, str) else image_url(item.relative,
                                                                              url_prefix)
            task: dict[str, Any] = {"data": {IMAGE_TAG: url,
                                             KEY_FIELD: item.record.get("image")}}
            if item.record.get("reviewed"):
                task["data"][REVIEWED_FIELD] = True
                task["annotations"] = [{"result": result}]
            else:
                task["predictions"] = [{
                    "model_version": item.record.get("model") or "unknown",
                    "score": sum(scores) / len(scores) if scores else None,
                    "result": result}]
            text = json.dumps(task, ensure_ascii=False, allow_nan=False)
            f.write(("\n" if n == 0 else ",\n") + text)
            stats.images += 1
        f.write("\n]\n")
    os.replace(partial, path)
    masks = (BRUSH_TAG if mask_format == "rle" else POLYGON_TAG) if any_mask else None
    (out / "label_config.xml").write_text(label_config(names, masks=masks, points=any_point),
                                          encoding="utf-8")
    return stats


def _mask_results(rid: str, b: Any, name: str, item: Any, mask_format: str,
                  stats: ExportStats) -> list[dict[str, Any]]:
    """The box's mask as one brush region, or one polygon region per external contour
    (none when it has no contour of 3 or more points: counted)."""
    w, h = item.width, item.height
    rle = segmentation.check_mask(b.mask, w, h, f"{item.relative}: box")
    stats.masks += 1
    mask = segmentation.decode(rle)
    if mask_format == "rle":
        value = {"format": "rle", "rle": segmentation.brush_rle(mask), "brushlabels": [name]}
        return [_result(rid, "brushlabels", BRUSH_TAG, w, h, value, b.score)]
    rings = segmentation.contours(mask)
    if not rings:
        stats.masks_without_polygon += 1
    return [_result(f"{rid}-{k}", "polygonlabels", POLYGON_TAG, w, h,
                    {"points": (ring / (w, h) * 100.0).tolist(), "closed": True,
                     "polygonlabels": [name]}, b.score)
            for k, ring in enumerate(rings)]


def _result(rid: str, kind: str, from_name: str, w: int, h: int, value: dict[str, Any],
            score: float | None) -> dict[str, Any]:
    r: dict[str, Any] = {"id": rid, "type": kind, "from_name": from_name, "to_name": IMAGE_TAG,
                         "original_width": w, "original_height": h, "image_rotation": 0,
                         "value": value}
    if score is not None:
        r["score"] = score
    return r


def label_config(names: list[str], *, masks: str | None = None, points: bool = True) -> str:
    """The labelling interface whose tag names the tasks refer to; ``masks``
    (``BRUSH_TAG`` or ``POLYGON_TAG``) adds the tag the mask regions use; ``points``
    the keypoint tag (only for runs with points: Label Studio's own COCO export of a
    project with both makes one keypoint category of the classes)."""
    labels = "".join(f'    <Label value="{escape(n, {chr(34): "&quot;"})}"/>\n' for n in names)
    extra = ""
    if masks is not None:
        tag = "BrushLabels" if masks == BRUSH_TAG else "PolygonLabels"
        extra = f'  <{tag} name="{masks}" toName="{IMAGE_TAG}">\n{labels}  </{tag}>\n'
    return (f'<View>\n  <Image name="{IMAGE_TAG}" value="${IMAGE_TAG}"/>\n'
            f'  <RectangleLabels name="{RECT_TAG}" toName="{IMAGE_TAG}">\n{labels}'
            f'  </RectangleLabels>\n'
            + (f'  <KeyPointLabels name="{POINT_TAG}" toName="{IMAGE_TAG}">\n{labels}'
               f'  </KeyPointLabels>\n' if points else "")
            + f'{extra}</View>\n')
