"""CVAT for images 1.1: ``out/annotations.xml`` plus the images under ``out/images``.

The layout of CVAT's own "CVAT for images 1.1" dataset export (zip ``out`` to upload it as
a task's annotations, or import it with datumaro's ``cvat`` format)::

    <annotations>
      <version>1.1</version>
      <meta><task>... <labels><label><name>cat</name> ...</label></labels></task></meta>
      <image id="0" name="sub/b.png" width="50" height="50">
        <box label="dog" source="auto" occluded="0" xtl="1.00" ytl="2.00" xbr="25.00"
             ybr="30.00" z_order="0"><attribute name="score">0.3</attribute></box>
        <points label="cat" source="auto" occluded="0" points="12.50,20.00" z_order="0"/>
      </image>
    </annotations>

Image names are the paths under ``images/``, as the other exporters name them; width and
height are the upright image's. Boxes are pixel edges, the frame of the records, with two
decimals as CVAT writes them; a point is a one-point ``<points>`` shape. Every label is
declared in ``<meta>`` with a ``score`` attribute (text, not mutable), so that CVAT
accepts the ``<attribute name="score">`` of a scored shape; an unscored shape has none.
Masks are not written (a box with a mask goes out as its box). ``<image>`` entries are
written to a temporary file as records stream in and spliced after ``<meta>`` (which
holds the image count) at the end.

:func:`read_cvat` reads CVAT for images 1.1 files back, CVAT's own included, to bring
human corrections home.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from grounding.formats.common import (
    ExportStats,
    check_class_names,
    placed_items,
    prepare_dir,
    select,
)
from grounding.formats.voc import colour


def export_cvat(records: Iterable[dict[str, Any]], images_root: Path | str,
                class_names: list[str], out: Path, *, min_score: float | None = None,
                copy: bool = False, overwrite: bool = False) -> ExportStats:
    """Write ``out/annotations.xml`` and ``out/images/<relative path>``; see the module
    and package docstrings for the rules."""
    names = check_class_names(class_names)
    out = Path(out)  # images_root: a Path, or a str URI (see iter_items)
    images_dir = out / "images"
    prepare_dir(images_dir, overwrite=overwrite, keep=images_root)
    stats = ExportStats()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+", encoding="utf-8", dir=out, prefix=".cvat-") as body:
        for item in placed_items(records, images_root, images_dir, copy=copy, stats=stats):
            kept = select(item, len(names), min_score, stats)
            image = ET.Element("image", {"id": str(stats.images), "name": item.relative,
                                         "width": str(item.width),
                                         "height": str(item.height)})
            for b in kept.boxes:
                x1, y1, x2, y2 = (f"{float(v):.2f}" for v in b.bbox)
                shape = ET.SubElement(image, "box", {
                    "label": names[b.class_id], "source": "auto", "occluded": "0",
                    "xtl": x1, "ytl": y1, "xbr": x2, "ybr": y2, "z_order": "0"})
                _score(shape, b.score)
            for p in kept.points:
                x, y = (f"{float(v):.2f}" for v in p.point)
                shape = ET.SubElement(image, "points", {
                    "label": names[p.class_id], "source": "auto", "occluded": "0",
                    "points": f"{x},{y}", "z_order": "0"})
                _score(shape, p.score)
            ET.indent(image, space="  ", level=1)
            body.write("  " + ET.tostring(image, encoding="unicode").rstrip() + "\n")
            stats.images += 1
        _splice(out / "annotations.xml", names, stats.images, body)
    return stats


def _score(shape: ET.Element, score: float | None) -> None:
    if score is not None:
        ET.SubElement(shape, "attribute", {"name": "score"}).text = repr(float(score))


def _meta(names: list[str], n_images: int) -> ET.Element:
    now = time.strftime("%Y-%m-%d %H:%M:%S.000000+00:00", time.gmtime())
    meta = ET.Element("meta")
    task = ET.SubElement(meta, "task")
    for key, value in (("id", 0), ("name", "grounding export"), ("size", n_images),
                       ("mode", "annotation"), ("overlap", 0), ("bugtracker", ""),
                       ("created", now), ("updated", now), ("subset", "default"),
                       ("start_frame", 0), ("stop_frame", max(n_images - 1, 0)),
                       ("frame_filter", "")):
        ET.SubElement(task, key).text = str(value)
    labels = ET.SubElement(task, "labels")
    for i, name in enumerate(names):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = "#{:02x}{:02x}{:02x}".format(*colour(i + 1))
        ET.SubElement(label, "type").text = "any"
        attribute = ET.SubElement(ET.SubElement(label, "attributes"), "attribute")
        for key, value in (("name", "score"), ("mutable", "False"), ("input_type", "text"),
                           ("default_value", ""), ("values", "")):
            ET.SubElement(attribute, key).text = value
    ET.SubElement(meta, "dumped").text = now
    return meta


def _splice(path: Path, names: list[str], n_images: int, body: IO[str]) -> None:
    """Header and meta, then the image entries copied in blocks; renamed into place when
    complete."""
    meta = _meta(names, n_images)
    ET.indent(meta, space="  ", level=1)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n'
                "  <version>1.1</version>\n  " + ET.tostring(meta, encoding="unicode")
                + "\n")
        body.seek(0)
        shutil.copyfileobj(body, f)
        f.write("</annotations>\n")
    os.replace(partial, path)


# --- Reading -------------------------------------------------------------------------------

SHAPES_IGNORED = ("polygon", "polyline", "mask", "ellipse", "cuboid", "skeleton", "tag")


def read_cvat(path: Path | str) -> list[dict[str, Any]]:
    """The images of a CVAT for images 1.1 file as grounding-style records, in file order:
    ``{"image": <name>, "width", "height", "detections": [{"label", "bbox": [x1, y1, x2,
    y2], "score"?, "attributes"}], "points": [{"label", "point": [x, y], "score"?,
    "attributes"}], "ignored": {shape: count}}``. ``path``: ``annotations.xml`` or the
    folder holding it.

    Tolerant of what CVAT writes: ``source``, ``occluded``, ``z_order``, ``group_id`` and
    any ``<attribute>`` (a numeric ``score`` one becomes ``score``, the others go to
    ``attributes`` as strings); a ``<points>`` shape of one point is a point, of several
    points is ignored; polygons, polylines, masks, ellipses, cuboids, skeletons and
    ``<tag>``s are ignored, counted per image in ``ignored``. Raises ValueError, one line
    naming the file (and image), for a file that is not CVAT XML, a CVAT for video file
    (``<track>``), a box whose coordinates are not numbers, and a rotated box (grounding's
    boxes are axis-aligned)."""
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.xml"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not XML: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if root.tag != "annotations":
        raise ValueError(f"{path}: not a CVAT XML file (root <{root.tag}>, not <annotations>)")
    if root.find("track") is not None:
        raise ValueError(f"{path}: CVAT for video (it has <track>s); export the task as "
                         "CVAT for images 1.1")
    records = []
    for image in root.findall("image"):
        name = image.get("name") or ""
        where = f"{path}: image {name!r}"
        record: dict[str, Any] = {"image": name, "width": _int(image.get("width")),
                                  "height": _int(image.get("height")), "detections": [],
                                  "points": [], "ignored": {}}
        for shape in image:
            if shape.tag == "box":
                record["detections"].append(_box(shape, where))
            elif shape.tag == "points" and len(xy := _xy(shape.get("points"), where)) == 1:
                entry = {"label": shape.get("label") or "", "point": xy[0]}
                entry.update(_attributes(shape))
                record["points"].append(entry)
            elif shape.tag in SHAPES_IGNORED or shape.tag == "points":
                record["ignored"][shape.tag] = record["ignored"].get(shape.tag, 0) + 1
        records.append(record)
    return records


def _box(shape: ET.Element, where: str) -> dict[str, Any]:
    label = shape.get("label") or ""
    rotation = _float(shape.get("rotation") or "0")
    if rotation is None or rotation % 360:
        raise ValueError(f"{where}: box {label!r} is rotated ({shape.get('rotation')} "
                         "degrees); grounding boxes are axis-aligned: set its rotation to "
                         "0 in CVAT, or delete it")
    values = [_float(shape.get(key)) for key in ("xtl", "ytl", "xbr", "ybr")]
    if None in values:
        raise ValueError(f"{where}: box {label!r}: xtl, ytl, xbr and ybr must be numbers, "
                         f"got {[shape.get(k) for k in ('xtl', 'ytl', 'xbr', 'ybr')]}")
    entry: dict[str, Any] = {"label": label, "bbox": values}
    entry.update(_attributes(shape))
    return entry


def _attributes(shape: ET.Element) -> dict[str, Any]:
    """``score`` (when a number) and ``attributes``: the shape's ``<attribute>``s."""
    attributes = {a.get("name") or "": (a.text or "").strip()
                  for a in shape.iterfind("attribute")}
    attributes.pop("", None)
    out: dict[str, Any] = {}
    score = _float(attributes.get("score"))
    if score is not None:
        out["score"] = score
        del attributes["score"]
    out["attributes"] = attributes
    return out


def _xy(text: str | None, where: str) -> list[list[float]]:
    """``"x1,y1;x2,y2"`` as [[x1, y1], [x2, y2]]."""
    pairs = []
    for pair in (text or "").split(";"):
        values = [_float(v) for v in pair.split(",")]
        if len(values) != 2 or None in values:
            raise ValueError(f"{where}: points must be \"x,y;x,y...\", got {text!r}")
        pairs.append(values)
    return pairs


def _int(text: str | None) -> int | None:
    value = _float(text)
    return None if value is None else int(value)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None
