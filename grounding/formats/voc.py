"""Pascal VOC detection export, in the layout datumaro and CVAT import as "PASCAL VOC".

    out/JPEGImages/NAME                 NAME: a/b/c.jpg -> a__b__c.jpg (as YOLO flattens)
    out/Annotations/STEM.xml            one per image, one <object> per box
    out/ImageSets/Main/default.txt      the STEMs (VOC's image ids), one a line
    out/labelmap.txt                    the classes, datumaro's "name:r,g,b::" lines

Names are flattened and matched by stem, as VOC readers do (supervision's
``from_pascal_voc`` lists only the top level of the images folder and finds
``Annotations/STEM.xml``): two images that flatten to one name, or share a stem (a.jpg
and a.png), are skipped and reported. Every image gets an annotation file, with no
``<object>`` when it has no boxes. ``<size>`` is the upright image's (depth 3).

Boxes: a record's box is float pixel edges, ``[x1, y1, x2, y2]`` with ``x2`` the right
edge (0-based). VOC's ``<bndbox>`` is 1-based inclusive pixel indices, whole numbers:
``xmin = round(x1) + 1``, ``ymin = round(y1) + 1``, ``xmax = round(x2)``,
``ymax = round(y2)`` (halves round up), clamped to the image, and at least one pixel wide
and high. That is the first and last pixel whose centre the box covers, so a reader that
undoes the VOC convention (``x1 = xmin - 1``, ``x2 = xmax``: the devkit, supervision,
:func:`read_voc`) gets the record's box back within half a pixel (a box thinner than a
pixel comes back one pixel wide). A reader that takes ``xmin`` as a 0-based edge (datumaro)
sees the box one pixel right of and below where it was.

VOC has no score: a scored box carries it as datumaro's (and CVAT's) object attribute,
``<attributes><attribute><name>score</name><value>0.9</value></attribute></attributes>``;
an unscored one has none. Each object also has the usual ``<pose>Unspecified</pose>``,
``<truncated>0</truncated>``, ``<difficult>0</difficult>`` and ``<occluded>0</occluded>``.
VOC detection holds no points (dropped and counted, as for YOLO) and no masks (a box
with a mask goes out as its box).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from grounding.formats.common import (
    ExportStats,
    check_class_names,
    iter_items,
    place_image,
    prepare_dir,
    select,
    taken,
)
from grounding.formats.yolo import flat_name


def export_voc(records: Iterable[dict[str, Any]], images_root: Path | str,
               class_names: list[str], out: Path, *, min_score: float | None = None,
               copy: bool = False, overwrite: bool = False) -> ExportStats:
    """Write the Pascal VOC dataset under ``out``; see the module and package docstrings.
    Raises ValueError for a class name ``labelmap.txt`` cannot hold (one with ``:`` or a
    line break)."""
    names = check_class_names(class_names)
    bad = [n for n in names if ":" in n or "\n" in n or "\r" in n]
    if bad:
        raise ValueError(f"class name {bad[0]!r}: a Pascal VOC labelmap.txt line is "
                         "name:r,g,b::, so a name cannot hold ':' or a line break")
    out = Path(out)  # images_root: a Path, or a str URI (see iter_items)
    for sub in ("JPEGImages", "Annotations", "ImageSets"):
        prepare_dir(out / sub, overwrite=overwrite, keep=images_root)
    (out / "ImageSets" / "Main").mkdir(parents=True)
    stats = ExportStats()
    with (out / "ImageSets" / "Main" / "default.txt").open("w", encoding="utf-8") as ids:
        for item in iter_items(records, images_root, stats):
            name = flat_name(item.relative)
            stem = Path(name).stem
            image_dst = out / "JPEGImages" / name
            xml_dst = out / "Annotations" / (stem + ".xml")
            if taken(image_dst) or taken(xml_dst):
                stats.skip(item.relative, f"output name {name} (or its annotation file "
                                          f"{stem}.xml) is already used by an earlier record")
                continue
            place_image(item, image_dst, copy=copy, stats=stats)
            kept = select(item, len(names), min_score, stats, points=False)
            objects = [(names[b.class_id], voc_box(b.bbox, item.width, item.height), b.score)
                       for b in kept.boxes]
            _write_annotation(xml_dst, name, item.width, item.height, objects)
            ids.write(stem + "\n")
            stats.images += 1
    write_labelmap(out / "labelmap.txt", names)
    return stats


def voc_box(bbox: Iterable[float], width: int, height: int) -> tuple[int, int, int, int]:
    """``(xmin, ymin, xmax, ymax)``, VOC's 1-based inclusive pixel indices, of a box of
    pixel edges (see the module docstring)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    xmin = min(max(_round(x1) + 1, 1), width)
    ymin = min(max(_round(y1) + 1, 1), height)
    return xmin, ymin, min(max(_round(x2), xmin), width), min(max(_round(y2), ymin), height)


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def _write_annotation(path: Path, filename: str, width: int, height: int,
                      objects: list[tuple[str, tuple[int, int, int, int], float | None]]
                      ) -> None:
    root = ET.Element("annotation")
    _sub(root, "folder", "JPEGImages")
    _sub(root, "filename", filename)
    _sub(ET.SubElement(root, "source"), "database", "grounding")
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        _sub(size, key, value)
    _sub(root, "segmented", 0)
    for name, (xmin, ymin, xmax, ymax), score in objects:
        obj = ET.SubElement(root, "object")
        _sub(obj, "name", name)
        for key, value in (("pose", "Unspecified"), ("truncated", 0), ("difficult", 0),
                           ("occluded", 0)):
            _sub(obj, key, value)
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            _sub(box, key, value)
        if score is not None:
            attribute = ET.SubElement(ET.SubElement(obj, "attributes"), "attribute")
            _sub(attribute, "name", "score")
            _sub(attribute, "value", repr(float(score)))
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _sub(parent: ET.Element, tag: str, text: Any) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = str(text)
    return element


def colour(index: int) -> tuple[int, int, int]:
    """The Pascal VOC colour map's colour ``index`` (0 is background's black)."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((index >> 0) & 1) << shift
        g |= ((index >> 1) & 1) << shift
        b |= ((index >> 2) & 1) << shift
        index >>= 3
    return r, g, b


def write_labelmap(path: Path, names: list[str]) -> None:
    """datumaro's ``labelmap.txt``: a header, then ``name:r,g,b::`` per class, coloured
    from VOC's colour map from index 1 (0, black, is VOC's background, not a class of
    the run and so not listed)."""
    lines = ["# label:color_rgb:parts:actions"]
    lines += [f"{n}:{','.join(map(str, colour(i + 1)))}::" for i, n in enumerate(names)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- Reading -------------------------------------------------------------------------------


def read_voc(path: Path | str) -> list[dict[str, Any]]:
    """The annotations of a Pascal VOC dataset as grounding-style records, sorted by file:
    ``{"image": <filename>, "width", "height", "detections": [{"label", "bbox": [x1, y1,
    x2, y2], "score"?, "attributes"}]}``, boxes as pixel edges (``xmin - 1, ymin - 1,
    xmax, ymax``: the module docstring's mapping undone). ``path``: the dataset folder
    (its ``Annotations/``, any depth), an ``Annotations`` folder, or one ``.xml`` file.
    ``score``: from the ``score`` attribute (``<attributes>``), or a ``<score>`` or
    ``<confidence>`` element; the other attributes go to ``attributes``, as strings.
    Raises ValueError naming the file for a file that is not VOC XML or a box that is
    not 4 numbers."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        folder = path / "Annotations" if (path / "Annotations").is_dir() else path
        if not folder.is_dir():
            raise ValueError(f"{path}: no such folder or file")
        files = sorted(folder.rglob("*.xml"))
    return [_read_annotation(f) for f in files]


def _read_annotation(path: Path) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not XML: {exc}") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: not a Pascal VOC annotation (root <{root.tag}>, not "
                         "<annotation>)")
    filename = (root.findtext("filename") or "").strip() or path.stem
    size = root.find("size")
    width = _int(size, "width") if size is not None else None
    height = _int(size, "height") if size is not None else None
    detections = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{path}: an <object> without <bndbox>")
        xmin, ymin, xmax, ymax = (_number(box, key, path)
                                  for key in ("xmin", "ymin", "xmax", "ymax"))
        attributes = {}
        for attribute in obj.iterfind("attributes/attribute"):
            key = (attribute.findtext("name") or "").strip()
            if key:
                attributes[key] = (attribute.findtext("value") or "").strip()
        det: dict[str, Any] = {"label": (obj.findtext("name") or "").strip(),
                               "bbox": [xmin - 1, ymin - 1, xmax, ymax]}
        score = attributes.pop("score", None)
        for text in (score, obj.findtext("score"), obj.findtext("confidence")):
            value = _float(text)
            if value is not None:
                det["score"] = value
                break
        det["attributes"] = attributes
        detections.append(det)
    return {"image": filename, "width": width, "height": height, "detections": detections}


def _number(parent: ET.Element, key: str, path: Path) -> float:
    value = _float(parent.findtext(key))
    if value is None:
        raise ValueError(f"{path}: <{key}> must be a number, got "
                         f"{parent.findtext(key)!r}")
    return value


def _int(parent: ET.Element, key: str) -> int | None:
    value = _float(parent.findtext(key))
    return None if value is None else int(value)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None
