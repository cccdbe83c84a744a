"""COCO detection export: ``out/annotations.json`` plus the images under ``out/images``.

Image entries and annotations are written to two temporary files as records stream in
and spliced into the final JSON at the end, so memory does not grow with the number of
images. Category ids are ``class_id + 1`` (COCO reserves 0). Points have no place in
COCO detection, so each image entry carries an extra field
``"points": [{"category_id", "point": [x, y], "score"}]``; pycocotools and supervision
ignore unknown image fields. An image a person reviewed (a record with ``"reviewed":
true``, from ``corrections.jsonl``) and each of its annotations carry ``"attributes":
{"reviewed": true}`` (CVAT's and Datumaro's COCO place for extra fields).

A box with a mask (``--masks``) gets ``segmentation``: its COCO RLE (``{"size",
"counts"}``, ``counts`` a string) by default, or with ``mask_format="polygon"`` every
external contour of the mask with 3 or more points as a flat ``[x1, y1, x2, y2, ...]``
list (OpenCV ``findContours``; holes are not kept, and the outline runs through the
centres of the boundary pixels: see ``formats.segmentation``); a mask with no such
contour keeps its RLE. Its ``area`` is then the mask's pixel count (pycocotools
``area``), and the file evaluates with pycocotools' ``iouType="segm"``. ``bbox`` stays
the detector's box. A box without a mask has no ``segmentation`` (and ``area`` is its
box's): evaluate such files with ``iouType="bbox"``.

Images are symlinked by default. supervision's ``DetectionDataset.from_coco`` refuses
images that resolve outside its images directory, symlinks included: export with
``copy=True`` for it (pycocotools and Ultralytics-style loaders follow links).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from grounding._version import __version__
from grounding.formats import segmentation
from grounding.formats.common import (
    ExportStats,
    check_class_names,
    placed_items,
    prepare_dir,
    select,
)
from grounding.formats.dataset import (
    Dataset,
    DatasetBox,
    DatasetError,
    DatasetImage,
    as_int,
    as_number,
    relative_path,
    show,
)


def export_coco(records: Iterable[dict[str, Any]], images_root: Path | str,
                class_names: list[str], out: Path, *, min_score: float | None = None,
                copy: bool = False, overwrite: bool = False,
                mask_format: str = "rle") -> ExportStats:
    """Write ``out/annotations.json`` and ``out/images/<relative path>``; see the module
    and package docstrings for the rules. ``mask_format``: how a box's mask is written
    as ``segmentation``, ``"rle"`` or ``"polygon"`` (see the module docstring)."""
    if mask_format not in segmentation.MASK_FORMATS:
        raise ValueError("mask_format must be one of "
                         f"{', '.join(segmentation.MASK_FORMATS)}, got {mask_format!r}")
    names = check_class_names(class_names)
    out = Path(out)  # images_root: a Path, or a str URI (see iter_items)
    images_dir = out / "images"
    prepare_dir(images_dir, overwrite=overwrite, keep=images_root)
    stats = ExportStats()
    image_id = annotation_id = 0
    with _temp(out) as images_tmp, _temp(out) as annotations_tmp:
        for item in placed_items(records, images_root, images_dir, copy=copy, stats=stats):
            kept = select(item, len(names), min_score, stats)
            image_id += 1
            stats.images += 1
            entry = {"id": image_id, "file_name": item.relative, "width": item.width,
                     "height": item.height,
                     "points": [{"category_id": p.class_id + 1, "point": list(p.point),
                                 "score": p.score} for p in kept.points]}
            reviewed = bool(item.record.get("reviewed"))
            if reviewed:  # a person's boxes (corrections.jsonl), not the model's
                entry["attributes"] = {"reviewed": True}
            _append(images_tmp, entry, first=image_id == 1)
            for b, (x, y, w, h) in zip(kept.boxes, kept.xywh.tolist(), strict=True):
                annotation_id += 1
                ann: dict[str, Any] = {"id": annotation_id, "image_id": image_id,
                                       "category_id": b.class_id + 1,
                                       "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
                if b.mask is not None:
                    ann.update(_segmentation(b.mask, item, mask_format, stats))
                if b.score is not None:
                    ann["score"] = b.score
                if reviewed:
                    ann["attributes"] = {"reviewed": True}
                _append(annotations_tmp, ann, first=annotation_id == 1)
        _splice(out / "annotations.json", names, images_tmp, annotations_tmp)
    return stats


def _segmentation(mask: dict[str, Any], item: Any, mask_format: str,
                  stats: ExportStats) -> dict[str, Any]:
    """``segmentation`` and ``area`` (the mask's pixels) of a box with a mask."""
    rle = segmentation.check_mask(mask, item.width, item.height, f"{item.relative}: box")
    stats.masks += 1
    out: dict[str, Any] = {"area": segmentation.area(rle)}
    if mask_format == "polygon":
        rings = segmentation.polygons(segmentation.decode(rle))
        if rings:
            out["segmentation"] = rings
            return out
        stats.masks_without_polygon += 1
    out["segmentation"] = segmentation.coco_rle(rle)
    return out


def _temp(out: Path) -> IO[str]:
    out.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryFile("w+", encoding="utf-8", dir=out, prefix=".coco-")


def _append(f: IO[str], obj: dict[str, Any], *, first: bool) -> None:
    f.write(("" if first else ",\n") + json.dumps(obj, ensure_ascii=False, allow_nan=False))


def _splice(path: Path, names: list[str], images: IO[str], annotations: IO[str]) -> None:
    """Header, then each temp file copied in blocks; renamed into place when complete."""
    info = {"description": "exported by grounding", "version": __version__,
            "year": time.gmtime().tm_year,
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    categories = [{"id": i + 1, "name": n, "supercategory": "object"}
                  for i, n in enumerate(names)]
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        f.write('{"info": ' + json.dumps(info) + ',\n"licenses": [],\n"categories": '
                + json.dumps(categories, ensure_ascii=False) + ',\n"images": [\n')
        images.seek(0)
        shutil.copyfileobj(images, f)
        f.write('\n],\n"annotations": [\n')
        annotations.seek(0)
        shutil.copyfileobj(annotations, f)
        f.write("\n]}\n")
    os.replace(partial, path)


# --- Reading -------------------------------------------------------------------------------


def load_coco(path: Path, images_root: Path | None = None) -> Dataset:
    """Read a COCO detection file (``export_coco``'s or any other) as a :class:`Dataset`:
    boxes turned from ``[x, y, width, height]`` into pixel xyxy, ``names`` from
    ``categories`` by id. ``images_root`` turns absolute ``file_name`` paths under it into
    relative ones.

    Malformed entries are left out with a reason in ``Dataset.warnings``: an image entry
    without a whole-number ``id``, a ``file_name`` or a positive size; an annotation
    without ``image_id`` or with one no image has; a ``category_id`` missing or not in
    ``categories``; a ``bbox`` that is not 4 finite numbers or has a negative size. Raises
    :class:`DatasetError` for a file that is not JSON or not a JSON object whose
    ``images``, ``annotations`` and ``categories`` are lists."""
    path = Path(path)
    root = None if images_root is None else Path(images_root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: a COCO file is a JSON object with images, annotations and categories; "
            f"this is a JSON {type(data).__name__} (a list is how detection results are "
            "written, not ground truth)")
    if "images" not in data:
        raise DatasetError(f"{path}: not a COCO detection file: it has no \"images\"")
    for key in ("images", "annotations", "categories"):
        if data.get(key) is not None and not isinstance(data[key], list):
            raise DatasetError(f"{path}: \"{key}\" must be a list, not "
                               f"{type(data[key]).__name__}")
    out = Dataset(str(path), {})
    for i, cat in enumerate(data.get("categories") or []):
        where = f"{path}: categories[{i}]"
        cid = as_int(cat.get("id")) if isinstance(cat, dict) else None
        if not isinstance(cat, dict):
            out.skip(where, f"not an object: {show(cat)}")
        elif cid is None:
            out.skip(where, f"id must be a whole number, got {show(cat.get('id'))}")
        elif cat.get("name") is None:
            out.skip(where, "no name")
        elif cid in out.names:
            out.skip(where, f"id {cid} already used by {out.names[cid]!r}")
        else:
            out.names[cid] = str(cat["name"])
    slot: dict[int, int] = {}
    for i, im in enumerate(data["images"] or []):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict):
            out.skip(where, f"not an object: {show(im)}")
            continue
        iid = as_int(im.get("id"))
        reason, image = _coco_image(im, iid, slot, root)
        if image is None:
            out.skip(where + ("" if iid is None else f" (id {iid})"), reason)
            continue
        slot[iid] = len(out.images)
        out.images.append(image)
    for i, ann in enumerate(data.get("annotations") or []):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            out.skip(where, f"not an object: {show(ann)}")
            continue
        if ann.get("id") is not None:
            where += f" (id {show(ann['id'])})"
        reason, box = _coco_box(ann, slot, out.names)
        if box is None:
            out.skip(where, reason)
            continue
        out.images[slot[as_int(ann["image_id"])]].boxes.append(box)
    return out


def _coco_image(im: dict[str, Any], iid: int | None, slot: dict[int, int],
                root: Path | None) -> tuple[str, DatasetImage | None]:
    """(why not, None) or ("", the image) for one image entry."""
    if iid is None:
        return f"id must be a whole number, got {show(im.get('id'))}", None
    if iid in slot:
        return f"id {iid} already used by an earlier image", None
    name = im.get("file_name")
    if not isinstance(name, str) or not name:
        return f"file_name must be a path, got {show(name)}", None
    w, h = as_int(im.get("width")), as_int(im.get("height"))
    if w is None or h is None or w <= 0 or h <= 0:
        return (f"width and height must be whole numbers > 0, got {show(im.get('width'))} "
                f"x {show(im.get('height'))}"), None
    return "", DatasetImage(relative_path(name, root), w, h)


def _coco_box(ann: dict[str, Any], slot: dict[int, int],
              names: dict[int, str]) -> tuple[str, DatasetBox | None]:
    """(why not, None) or ("", the box) for one annotation."""
    if ann.get("image_id") is None:
        return "no image_id", None
    iid = as_int(ann["image_id"])
    if iid is None:
        return f"image_id must be a whole number, got {show(ann['image_id'])}", None
    if iid not in slot:
        return f"image_id {iid} is not the id of any (usable) image", None
    if ann.get("category_id") is None:
        return "no category_id", None
    cid = as_int(ann["category_id"])
    if cid is None or cid not in names:
        return (f"category_id {show(ann['category_id'])} is not in categories "
                f"(ids {sorted(names)[:20]})"), None
    bbox = ann.get("bbox")
    values = ([as_number(v) for v in bbox] if isinstance(bbox, list | tuple) else [])
    if len(values) != 4 or None in values:
        return f"bbox must be 4 numbers [x, y, width, height], got {show(bbox)}", None
    x, y, w, h = values
    if w < 0 or h < 0:
        return f"bbox has a negative width or height: {show(bbox)}", None
    return "", DatasetBox(cid, x, y, x + w, y + h, bool(ann.get("iscrowd", 0)),
                          _segmentation_of(ann.get("segmentation")))


def _segmentation_of(value: Any) -> Any:
    """``segmentation`` when it has a shape pycocotools reads (a list of polygons of 3 or
    more finite x, y pairs, or an RLE dict with a 2-number size and counts), else None."""
    if isinstance(value, list):
        ok = value and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                           and all(as_number(v) is not None for v in p) for p in value)
        return value if ok else None
    if isinstance(value, dict):
        size = value.get("size")
        if (isinstance(size, list) and len(size) == 2 and all(as_int(v) is not None
                                                              for v in size)
                and isinstance(value.get("counts"), list | str)):
            return value
    return None
