"""COCO detection export: ``out/annotations.json`` plus the images under ``out/images``.

Image entries and annotations are written to two temporary files as records stream in
and spliced into the final JSON at the end, so memory does not grow with the number of
images. Category ids are ``class_id + 1`` (COCO reserves 0). Points have no place in
COCO detection, so each image entry carries an extra field
``"points": [{"category_id", "point": [x, y], "score"}]``; pycocotools and supervision
ignore unknown image fields.

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
from grounding.formats.common import (
    ExportStats,
    check_class_names,
    iter_items,
    place_image,
    prepare_dir,
    select_boxes,
    select_points,
    taken,
)


def export_coco(records: Iterable[dict[str, Any]], images_root: Path, class_names: list[str],
                out: Path, *, min_score: float | None = None, copy: bool = False,
                overwrite: bool = False) -> ExportStats:
    """Write ``out/annotations.json`` and ``out/images/<relative path>``; see the module
    and package docstrings for the rules."""
    names = check_class_names(class_names)
    images_root, out = Path(images_root), Path(out)
    images_dir = out / "images"
    prepare_dir(images_dir, overwrite=overwrite, keep=images_root)
    stats = ExportStats()
    image_id = annotation_id = 0
    with _temp(out) as images_tmp, _temp(out) as annotations_tmp:
        for item in iter_items(records, images_root, stats):
            dst = images_dir / item.relative
            if taken(dst):
                stats.skip(item.relative, "listed twice in the records")
                continue
            place_image(item, dst, copy=copy, stats=stats)
            boxes = select_boxes(item, len(names), min_score, stats)
            points = select_points(item, len(names), min_score, stats)
            image_id += 1
            stats.images += 1
            entry = {"id": image_id, "file_name": item.relative, "width": item.width,
                     "height": item.height,
                     "points": [{"category_id": p.class_id + 1, "point": [p.x, p.y],
                                 "score": p.score} for p in points]}
            _append(images_tmp, entry, first=image_id == 1)
            for b in boxes:
                annotation_id += 1
                w, h = b.x2 - b.x1, b.y2 - b.y1
                ann: dict[str, Any] = {"id": annotation_id, "image_id": image_id,
                                       "category_id": b.class_id + 1,
                                       "bbox": [b.x1, b.y1, w, h], "area": w * h, "iscrowd": 0}
                if b.score is not None:
                    ann["score"] = b.score
                _append(annotations_tmp, ann, first=annotation_id == 1)
        _splice(out / "annotations.json", names, images_tmp, annotations_tmp)
    return stats


def _temp(out: Path) -> IO[str]:
    out.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryFile("w+", encoding="utf-8", dir=out, prefix=".coco-")


def _append(f: IO[str], obj: dict[str, Any], *, first: bool) -> None:
    f.write(("" if first else ",\n") + json.dumps(obj, ensure_ascii=False))


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
