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
split hashes (seed, relative path), so an image keeps its split when images are added.
YOLO detection labels hold no points: they are dropped and counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from grounding.formats.common import (
    ExportStats,
    check_class_names,
    iter_items,
    place_image,
    prepare_dir,
    select_boxes,
    taken,
)


def export_yolo(records: Iterable[dict[str, Any]], images_root: Path, class_names: list[str],
                out: Path, *, val_fraction: float = 0.2, seed: int = 0,
                min_score: float | None = None, copy: bool = False,
                overwrite: bool = False) -> ExportStats:
    """Write the Ultralytics dataset under ``out``; see the module and package docstrings."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    names = check_class_names(class_names)
    images_root, out = Path(images_root), Path(out)
    for sub in ("images", "labels"):
        prepare_dir(out / sub, overwrite=overwrite, keep=images_root)
    for sub in ("images", "labels"):
        for split in ("train", "val"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)
    stats = ExportStats()
    for item in iter_items(records, images_root, stats):
        split = "val" if is_val(item.relative, val_fraction, seed) else "train"
        name = flat_name(item.relative)
        image_dst = out / "images" / split / name
        label_dst = out / "labels" / split / (Path(name).stem + ".txt")
        if taken(image_dst) or taken(label_dst):
            stats.skip(item.relative, f"output name {split}/{name} (or its label file) is "
                                      "already used by an earlier record")
            continue
        place_image(item, image_dst, copy=copy, stats=stats)
        boxes = select_boxes(item, len(names), min_score, stats)
        n_points = len(item.record.get("points") or [])
        stats.points_not_supported += n_points
        rows = [_row(b.class_id, b.x1, b.y1, b.x2, b.y2, item.width, item.height)
                for b in boxes]
        label_dst.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        stats.images += 1
    write_data_yaml(out / "data.yaml", out.resolve(), names)
    return stats


def flat_name(relative: str) -> str:
    return relative.replace("/", "__")


def is_val(relative: str, val_fraction: float, seed: int) -> bool:
    """Deterministic per image: the same answer on every machine and every run."""
    digest = hashlib.sha256(f"{seed}\0{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def _row(class_id: int, x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> str:
    cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
    return f"{class_id} {cx:.6f} {cy:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"


def write_data_yaml(path: Path, root: Path, names: list[str]) -> None:
    """Hand-written YAML: every string double-quoted, so no name can change its type or
    the structure ("null", "1e3", "a: b", "# x" all stay strings)."""
    lines = ["# written by grounding", f"path: {yaml_quote(root.as_posix())}",
             "train: images/train", "val: images/val"]
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
