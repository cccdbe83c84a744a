"""YOLO detection export in the Ultralytics layout.

    out/data.yaml                     path, train, val, names
    out/images/{train,val}/NAME       NAME: a/b/c.jpg -> a__b__c.jpg
    out/labels/{train,val}/STEM.txt   "class cx cy w h" normalised, one row per box

Every image gets a label file, empty when it has no boxes: an empty file says "no
objects here", while a missing one reads as "not labelled" to some tools (Ultralytics
trains on both as background but reports the file missing). Names are flattened because
several readers (supervision's ``from_yolo`` among them) list only the top level of
``images/<split>`` and find a label by the image's stem; two sources that flatten to the
same name, or share a stem (a.jpg and a.png), are skipped and reported. The train/val
split hashes (seed, relative path), so an image keeps its split when images are added;
with a fraction strictly between 0 and 1 and at least two images, neither split is left
empty: when the hash put every image on one side (likely for a handful of images), the
image whose hash is nearest the other side moves there (deterministic too). A fraction of
0 puts every image in train, 1 every image in val.
YOLO detection labels hold no points: they are dropped and counted.

With ``task="segment"`` the labels are Ultralytics segmentation rows,
``class x1 y1 x2 y2 ...`` normalised, one per box that has a mask (``--masks``): the
mask's largest external contour (``contours="largest"``, the default), or every external
contour joined into one ring by zero-width bridges (``contours="all"``, as Ultralytics'
own ``convert_coco`` joins a multi-part COCO object): one row is one instance to
Ultralytics, so the parts of one object are never written as several rows. Boxes without
a mask, and masks without a contour of 3 or more points, are left out and counted (a
box is not an outline, and rows of both kinds in one file make Ultralytics read every
row as a polygon). See ``formats.segmentation`` for how contours are traced.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from grounding.formats import segmentation
from grounding.formats.common import (
    ExportStats,
    check_class_names,
    iter_items,
    place_image,
    prepare_dir,
    select,
    taken,
)
from grounding.formats.dataset import (
    Dataset,
    DatasetBox,
    DatasetError,
    DatasetImage,
    as_int,
    show,
)
from grounding.io.images import IMAGE_EXTENSIONS, displayed_size

TASKS = ("detect", "segment")


def export_yolo(records: Iterable[dict[str, Any]], images_root: Path | str,
                class_names: list[str], out: Path, *, val_fraction: float = 0.2, seed: int = 0,
                min_score: float | None = None, copy: bool = False,
                overwrite: bool = False, task: str = "detect",
                contours: str = "largest") -> ExportStats:
    """Write the Ultralytics dataset under ``out``; see the module and package docstrings.
    ``task="segment"`` writes segmentation labels from the boxes' masks, one polygon per
    box: its largest contour, or with ``contours="all"`` every contour joined into one."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if contours not in segmentation.CONTOURS:
        raise ValueError(f"contours must be one of {', '.join(segmentation.CONTOURS)}, "
                         f"got {contours!r}")
    names = check_class_names(class_names)
    out = Path(out)  # images_root: a Path, or a str URI (see iter_items)
    for sub in ("images", "labels"):
        prepare_dir(out / sub, overwrite=overwrite, keep=images_root)
    for sub in ("images", "labels"):
        for split in ("train", "val"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)
    stats = ExportStats()
    counts = {"train": 0, "val": 0}
    # The image of each split nearest the other, (hash value, name): the lowest value in
    # train, the highest in val; it moves when the other split would stay empty.
    # Constant memory, like the rest of the export.
    nearest: dict[str, tuple[float, str]] = {}
    for item in iter_items(records, images_root, stats):
        value = split_value(item.relative, seed)
        split = "val" if value < val_fraction else "train"
        name = flat_name(item.relative)
        image_dst = out / "images" / split / name
        label_dst = out / "labels" / split / (Path(name).stem + ".txt")
        if taken(image_dst) or taken(label_dst):
            stats.skip(item.relative, f"output name {split}/{name} (or its label file) is "
                                      "already used by an earlier record")
            continue
        place_image(item, image_dst, copy=copy, stats=stats)
        kept = select(item, len(names), min_score, stats, points=False)
        if task == "segment":
            rows = _segment_rows(kept.boxes, item, contours, stats)
        else:
            rows = [f"{b.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n"
                    for b, (cx, cy, w, h) in zip(kept.boxes, kept.xywhn.tolist(),
                                                 strict=True)]
        label_dst.write_text("".join(rows), encoding="utf-8")
        stats.images += 1
        counts[split] += 1
        pick = min if split == "train" else max
        nearest[split] = pick(nearest.get(split, (value, name)), (value, name))
    if 0.0 < val_fraction < 1.0 and stats.images >= 2:
        for empty, full in (("val", "train"), ("train", "val")):
            if counts[empty] == 0:
                _move(out, nearest[full][1], full, empty)
                counts[empty], counts[full] = 1, counts[full] - 1
    write_data_yaml(out / "data.yaml", out.resolve(), names, task=task)
    return stats


def _segment_rows(boxes: list[Any], item: Any, contours: str,
                  stats: ExportStats) -> list[str]:
    """``class x1 y1 x2 y2 ...`` normalised, one row per box with a usable mask; the
    others are left out and counted."""
    rows = []
    for b in boxes:
        if b.mask is None:
            stats.boxes_without_mask += 1
            continue
        rle = segmentation.check_mask(b.mask, item.width, item.height,
                                      f"{item.relative}: box")
        stats.masks += 1
        rings = segmentation.contours(segmentation.decode(rle))
        if not rings:
            stats.masks_without_polygon += 1
            continue
        ring = segmentation.joined(rings) if contours == "all" else rings[0]
        xy = np.clip(ring / (item.width, item.height), 0.0, 1.0).reshape(-1)
        rows.append(f"{b.class_id} " + " ".join(f"{v:.6f}" for v in xy.tolist()) + "\n")
    return rows


def _move(out: Path, name: str, source: str, target: str) -> None:
    """Move one exported image (a link, a copy or an upright file) and its label file
    from split ``source`` to ``target``. The target split is empty, so nothing is
    overwritten."""
    label = Path(name).stem + ".txt"
    os.replace(out / "images" / source / name, out / "images" / target / name)
    os.replace(out / "labels" / source / label, out / "labels" / target / label)


def flat_name(relative: str) -> str:
    return relative.replace("/", "__")


def split_value(relative: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, relative path): the same on every machine and
    every run, and for an image whatever other images there are."""
    digest = hashlib.sha256(f"{seed}\0{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_val(relative: str, val_fraction: float, seed: int) -> bool:
    """Deterministic per image: the same answer on every machine and every run. (The
    export may then move one image so that neither split is empty; see
    :func:`export_yolo`.)"""
    return split_value(relative, seed) < val_fraction


def write_data_yaml(path: Path, root: Path, names: list[str], *,
                    task: str = "detect") -> None:
    """Hand-written YAML: every string double-quoted, so no name can change its type or
    the structure ("null", "1e3", "a: b", "# x" all stay strings). A segmentation
    dataset says so in a comment and a ``task`` key, for people and tools that look;
    Ultralytics itself takes the task from the model (a ``-seg`` one) or ``task=segment``,
    not from data.yaml, and ignores the key."""
    lines = ["# written by grounding", f"path: {yaml_quote(root.as_posix())}",
             "train: images/train", "val: images/val"]
    if task == "segment":
        lines[1:1] = ["# segmentation labels (class x1 y1 x2 y2 ... normalised): train "
                      "with task=segment, e.g. yolo11n-seg.pt", 'task: "segment"']
    if names:
        lines.append("names:")
        lines += [f"  {i}: {yaml_quote(n)}" for i, n in enumerate(names)]
    else:
        lines.append("names: {}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def yaml_quote(text: str) -> str:
    """A YAML double-quoted scalar; characters YAML may not hold raw are escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code <= 0x7E or (0xA0 <= code <= 0xD7FF) or (0xE000 <= code <= 0xFFFD) \
                or 0x10000 <= code <= 0x10FFFF:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


# --- Reading -------------------------------------------------------------------------------


def load_yolo(root: Path) -> Dataset:
    """Read an Ultralytics detection dataset (``export_yolo``'s or any other) as a
    :class:`Dataset`: every image under ``images/`` (any depth, suffixes in
    ``IMAGE_EXTENSIONS``), its label at the same path under ``labels/`` with ``.txt``
    (none: no objects), ``names`` from ``data.yaml``. Sizes are as displayed (EXIF
    applied), the frame Ultralytics normalises against; boxes come back in pixel xyxy, a
    polygon row as its enclosing box.

    Malformed rows are left out with ``FILE:LINE: reason`` in ``Dataset.warnings``: not
    numbers, a class that is not a whole number in ``names``, a count that is neither a box
    (class cx cy w h, maybe a trailing score) nor a polygon (class and 3 or more x y
    pairs), a value outside 0..1. An image PIL cannot read, or whose label file cannot be
    read, is left out the same way, and so is a label file no image claims. Raises
    :class:`DatasetError` when ``data.yaml`` is missing, not a YAML mapping or without
    ``names``, or there is no ``images/`` folder."""
    import yaml  # a dependency of grounding

    root = Path(root)
    spec_path = root / "data.yaml"
    if not spec_path.is_file():
        raise DatasetError(f"{root}: no data.yaml; a YOLO dataset folder holds data.yaml, "
                           "images/ and labels/")
    try:
        spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{spec_path}: not YAML: {exc}") from None
    out = Dataset(str(root), _yolo_names(spec, spec_path))
    image_dir, label_dir = root / "images", root / "labels"
    if not image_dir.is_dir():
        raise DatasetError(f"{root}: no images/ folder")
    claimed: set[Path] = set()
    for path in sorted(p for p in image_dir.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        relative = path.relative_to(image_dir).as_posix()
        label = (label_dir / relative).with_suffix(".txt")
        claimed.add(label)
        try:
            w, h = displayed_size(path)
        except (OSError, SyntaxError, ValueError) as exc:
            out.skip(str(path), f"cannot read the image ({exc}); left out")
            continue
        image = DatasetImage(relative, w, h)
        if label.is_file():
            try:
                text = label.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                out.skip(str(label), f"cannot read the label file ({exc}); image "
                                     f"{relative} left out")
                continue
            for number, line in enumerate(text.splitlines(), 1):
                reason, box = _yolo_box(line, out.names, w, h)
                if box is not None:
                    image.boxes.append(box)
                elif reason:
                    out.skip(f"{label}:{number}", reason)
        out.images.append(image)
    if label_dir.is_dir():
        for label in sorted(label_dir.rglob("*.txt")):
            if label not in claimed and label.is_file():
                out.skip(str(label), "no image for this label file (looked for the same path "
                                     f"under images/ ending {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return out


def _yolo_names(spec: Any, where: Path) -> dict[int, str]:
    """Class index -> name from data.yaml's ``names``: a list, or a mapping by index."""
    if not isinstance(spec, dict):
        raise DatasetError(f"{where}: must be a YAML mapping with names, got "
                           f"{type(spec).__name__}")
    if "names" not in spec:
        raise DatasetError(f"{where}: no names")
    raw = spec["names"] or {}
    if isinstance(raw, list):
        return {i: str(n) for i, n in enumerate(raw)}
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: names must be a list or a mapping of class index to "
                           f"name, got {show(raw)}")
    names: dict[int, str] = {}
    for key, name in raw.items():
        index = int(key) if isinstance(key, str) and key.strip().isdigit() else as_int(key)
        if index is None or index < 0:
            raise DatasetError(f"{where}: names key {show(key)} is not a class index")
        names[index] = str(name)
    return names


def _yolo_box(line: str, names: dict[int, str], w: int,
              h: int) -> tuple[str, DatasetBox | None]:
    """(why not, None), ("", None) for a blank line, or ("", the box in pixels)."""
    values = line.split()
    if not values:
        return "", None
    try:
        nums = [float(v) for v in values]
    except ValueError:
        return f"not numbers: {show(line.strip())}", None
    if not all(math.isfinite(v) for v in nums):
        return f"not finite numbers: {show(line.strip())}", None
    class_id = as_int(nums[0])
    if class_id is None or class_id < 0:
        return f"class must be a whole number >= 0, got {values[0]!r}", None
    if class_id not in names:
        return f"class {class_id} is not in data.yaml names ({len(names)} classes)", None
    coords = nums[1:]
    if len(coords) in (4, 5):  # a box, maybe with a trailing score
        cx, cy, bw, bh = coords[:4]
        x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    elif len(coords) >= 6 and len(coords) % 2 == 0:  # a polygon: its enclosing box
        xs, ys = coords[0::2], coords[1::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    else:
        return (f"{len(values)} values; a box row is 5 numbers \"class cx cy w h\" (a 6th, "
                "a score, is allowed), a polygon row \"class x y x y x y ...\""), None
    if any(not 0.0 <= v <= 1.0 for v in coords):
        return ("values outside 0..1 (YOLO coordinates are fractions of the image size): "
                f"{show(line.strip())}"), None
    return "", DatasetBox(class_id, x1 * w, y1 * h, x2 * w, y2 * h)
