"""Human corrections of a run's boxes: ``RUN_DIR/corrections.jsonl``.

Each line is one reviewed image::

    {"image": <the run's record key>, "width": int, "height": int,
     "detections": [{"label": str, "class_id": int | null, "bbox": [x1, y1, x2, y2]}],
     "reviewed": true, "source": "labelstudio" | "cvat" | "coco", "time": str}

boxes in upright image pixels (the frame of the records). Lines are only appended; the
last line of an image wins (:func:`read_corrections`). An image accepted as is has the
boxes it was shown; an image whose boxes were all deleted has ``"detections": []``.
Corrections hold boxes only: a corrected image keeps the model's points.

:func:`import_corrections` reads a Label Studio JSON export (its tasks' latest
annotation that was not cancelled; a task without one was not reviewed and is left
out), a CVAT for images 1.1 XML file or a COCO detection file (every image in it counts
as reviewed) and maps each image to the run's key: exactly by the ``grounding_image``
that grounding's Label Studio tasks carry, else by the name the exports give the image
(its path under the images folder, :func:`grounding.formats.common.locate`), the
file's name or a Label Studio URL ending in it. Labels map to the run's classes by name
(exact, then ignoring case); a label that is not a class is an error naming it and
nothing is imported (a misspelt class would otherwise vanish from every export). A run
without a class list keeps every label with ``class_id`` null.

:func:`apply_corrections` is what exports use: a corrected image's record gets the human
boxes (``score`` null, ``attributes`` ``{"reviewed": true}``) and ``"reviewed": true``.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from grounding.core.errors import GroundingError
from grounding.formats.common import locate
from grounding.formats.labelstudio import IMAGE_TAG, KEY_FIELD
from grounding.io.records import latest_lines, repair_jsonl
from grounding.runs.rundir import RunDir
from grounding.runs.sources import image_base

FILE_NAME = "corrections.jsonl"
SOURCES = ("labelstudio", "cvat", "coco")
MAX_LISTED = 20


class CorrectionsError(GroundingError, ValueError):
    """A corrections file that cannot be imported (one line, naming the file)."""


@dataclass
class ImportReport:
    """What :func:`import_corrections` did."""

    source: str
    imported: int = 0
    """Images written to corrections.jsonl."""
    boxes: int = 0
    not_reviewed: int = 0
    """Label Studio tasks with no annotation that was not cancelled."""
    unmatched: list[str] = field(default_factory=list)
    """Images of the file that are not images of the run."""
    skipped: list[str] = field(default_factory=list)
    """``"image: reason"`` for images or boxes left out (size differs, empty box, ...)."""
    ignored_shapes: int = 0
    rotated: int = 0
    """Label Studio rectangles drawn rotated, taken as the upright box around them."""
    """Regions that are not rectangles (points, polygons, brushes): not corrections."""


def corrections_path(run: RunDir) -> Path:
    return run.path / FILE_NAME


def read_corrections(run: RunDir | Path | str) -> dict[str, dict[str, Any]]:
    """The effective corrections of a run: image key -> its last corrections line (empty
    when the run has none)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    latest, _ = latest_lines(corrections_path(run))
    return {image: entry for image, (_, entry) in latest.items()}


def corrected_record(record: dict[str, Any], correction: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the human boxes of ``correction`` (see the module docstring)."""
    boxes = [{"label": d.get("label"), "class_id": d.get("class_id"),
              "bbox": [float(v) for v in d["bbox"]], "score": None,
              "attributes": {"reviewed": True}, "model_bbox": None}
             for d in correction.get("detections") or []]
    out = {**record, "detections": boxes, "reviewed": True, "error": None}
    if out.get("width") is None or out.get("height") is None:
        out["width"], out["height"] = correction.get("width"), correction.get("height")
    return out


def apply_corrections(records: Iterable[dict[str, Any]],
                      corrections: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each record, a corrected image's with the human boxes instead of the model's."""
    for record in records:
        correction = corrections.get(record.get("image")) if corrections else None
        yield record if correction is None else corrected_record(record, correction)


# --- Importing ---------------------------------------------------------------------------


@dataclass
class _Image:
    """One image of a corrections file, before it is matched to the run."""

    where: str
    name: str | None
    key: str | None
    """The run's key when the file says it (grounding's Label Studio tasks)."""
    width: int | None
    height: int | None
    boxes: list[tuple[str, list[float]]]


def detect_source(path: Path) -> str:
    """labelstudio, cvat or coco, by the file's content."""
    if path.is_dir():
        if (path / "annotations.xml").is_file():
            return "cvat"
        raise CorrectionsError(f"{path}: a folder; give a Label Studio JSON export, a CVAT "
                               "XML file or a COCO JSON file")
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        raise CorrectionsError(f"{path}: {exc.strerror or exc}") from None
    if head.startswith(b"<"):
        return "cvat"
    if head.startswith(b"["):
        return "labelstudio"
    if head.startswith(b"{"):
        return "coco"
    raise CorrectionsError(f"{path}: not a Label Studio JSON export (a list of tasks), a "
                           "CVAT XML file or a COCO JSON file")


def import_corrections(run: RunDir | Path | str, path: Path | str, *,
                       source: str | None = None) -> ImportReport:
    """Read ``path`` (see the module docstring), map its images to the run's and append
    one corrections line per image. Raises :class:`CorrectionsError` (nothing written)
    for an unreadable file, a label that is not a class, or a file none of whose images
    is an image of the run."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    path = Path(path)
    config = run.config()
    classes = config.get("classes")
    source = source or detect_source(path)
    if source not in SOURCES:
        raise CorrectionsError(f"source {source!r}: choose from {', '.join(SOURCES)}")
    report = ImportReport(source)
    reader = {"labelstudio": _labelstudio, "cvat": _cvat, "coco": _coco}[source]
    images = reader(path, report)
    records = {r["image"]: r for r in run.records() if isinstance(r.get("image"), str)}
    names = _names(records, image_base(config["images_dir"]))
    lines = []
    unknown: dict[str, str] = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for im in images:
        key = im.key if im.key in records else _match(im.name, names)
        if key is None:
            _listed(report.unmatched, im.key or im.name or im.where)
            continue
        record = records[key]
        width, height = record.get("width"), record.get("height")
        if width is None or height is None:
            width, height = im.width, im.height
        if width is None or height is None:
            _listed(report.skipped, f"{key}: no size in the run or the file")
            continue
        if im.width is not None and (im.width, im.height) != (width, height):
            _listed(report.skipped, f"{key}: {im.where} is {im.width}x{im.height}, the run's "
                                    f"record {width}x{height}")
            continue
        detections = []
        for label, bbox in im.boxes:
            box = _clip(bbox, width, height)
            if box is None:
                _listed(report.skipped, f"{key}: empty box {bbox} of {label!r} left out")
                continue
            class_id = _class_id(label, classes)
            if class_id is False:
                unknown.setdefault(label, im.where)
                continue
            detections.append({"label": label, "class_id": class_id, "bbox": box})
        lines.append({"image": key, "width": int(width), "height": int(height),
                      "detections": detections, "reviewed": True, "source": source,
                      "time": stamp})
    if unknown:
        label, where = next(iter(unknown.items()))
        more = f" (and {', '.join(map(repr, list(unknown)[1:]))})" if len(unknown) > 1 else ""
        raise CorrectionsError(
            f"{path}: label {label!r} ({where}){more} is not a class of {run.path} "
            f"({', '.join(classes or [])}); nothing imported")
    if not lines and report.not_reviewed and not report.unmatched:
        raise CorrectionsError(f"{path}: no task in it is annotated yet ({report.not_reviewed} "
                               "tasks without an annotation); nothing imported")
    if not lines:
        example = f" (e.g. {report.unmatched[0]})" if report.unmatched else ""
        raise CorrectionsError(f"{path}: no reviewed image of it is an image of {run.path}"
                               + example)
    target = corrections_path(run)
    repair_jsonl(target)
    with target.open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    report.imported = len(lines)
    report.boxes = sum(len(line["detections"]) for line in lines)
    return report


def _listed(items: list[str], text: str) -> None:
    if len(items) < MAX_LISTED:
        items.append(text)


def _names(records: dict[str, dict[str, Any]], base: str) -> dict[str, str | None]:
    """Name -> run key: the key itself, the export name, and the file name when only one
    image has it (None marks a file name several images share)."""
    names: dict[str, str | None] = {}
    short: dict[str, str | None] = {}
    for key in records:
        found = locate(key, base)
        for name in {key, found[0] if found else key}:
            names[name] = key
        leaf = posixpath.basename(found[0] if found else key)
        short[leaf] = None if leaf in short and short[leaf] != key else key
    for leaf, key in short.items():
        names.setdefault(leaf, key)
    return names


def _match(name: str | None, names: dict[str, str | None]) -> str | None:
    """The run key of a file's image name: exact, else the longest tail of its path (a
    URL such as ``/data/local-files/?d=photos/a.jpg`` ends in the export name)."""
    if not name:
        return None
    text = unquote(name.split("?d=", 1)[1] if "?d=" in name else name)
    if text in names:
        return names[text]
    if "://" in text:
        text = text.split("://", 1)[1]
    parts = [p for p in text.replace("\\", "/").split("/") if p]
    for i in range(len(parts)):
        key = names.get("/".join(parts[i:]))
        if key is not None:
            return key
    return None


def _clip(bbox: list[float], width: int, height: int) -> list[float] | None:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return [round(x1, 3), round(y1, 3), round(x2, 3), round(y2, 3)]


def _class_id(label: str, classes: list[str] | None) -> int | bool | None:
    """The class index of ``label``; None in a run without classes; False when it is not
    a class."""
    if not classes:
        return None
    if label in classes:
        return classes.index(label)
    folded = [c.casefold() for c in classes]
    if label.casefold() in folded:
        return folded.index(label.casefold())
    return False


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorrectionsError(f"{path}: not a JSON file: {exc}") from None
    except OSError as exc:
        raise CorrectionsError(f"{path}: {exc.strerror or exc}") from None


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """A task's latest annotation that was not cancelled (skipped), or None."""
    done = [a for a in task.get("annotations") or []
            if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                    a.get("id") or 0))


def _labelstudio(path: Path, report: ImportReport) -> list[_Image]:
    tasks = _load_json(path)
    if not isinstance(tasks, list):
        raise CorrectionsError(f"{path}: a Label Studio JSON export is a list of tasks")
    out = []
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise CorrectionsError(f"{path}: task {i} has no data: not a Label Studio export")
        data = task["data"]
        where = f"task {task.get('id', i)}"
        annotation = latest_annotation(task)
        if annotation is None:
            report.not_reviewed += 1
            continue
        width = height = None
        boxes = []
        for r in annotation.get("result") or []:
            if not isinstance(r, dict) or r.get("type") != "rectanglelabels":
                report.ignored_shapes += 1
                continue
            w, h = r.get("original_width"), r.get("original_height")
            if w is not None and h is not None:
                width, height = int(w), int(h)
            v = r.get("value") or {}
            labels = v.get("rectanglelabels") or []
            if w is None or h is None or not labels:
                _listed(report.skipped, f"{where}: region {r.get('id')} has no size or label")
                continue
            report.rotated += bool(float(v.get("rotation") or 0) % 360)
            boxes.append((str(labels[0]), _rectangle(v, float(w), float(h))))
        image = data.get(IMAGE_TAG)
        out.append(_Image(where, str(image) if image is not None else None,
                          data.get(KEY_FIELD), width, height, boxes))
    return out


def _rectangle(v: dict[str, Any], w: float, h: float) -> list[float]:
    """A Label Studio rectangle (percent; rotated by ``rotation`` degrees clockwise about
    its top-left corner) as the pixel box around it."""
    import math

    x, y = float(v["x"]) * w / 100, float(v["y"]) * h / 100
    bw, bh = float(v["width"]) * w / 100, float(v["height"]) * h / 100
    angle = math.radians(float(v.get("rotation") or 0))
    if not angle:
        return [x, y, x + bw, y + bh]
    c, s = math.cos(angle), math.sin(angle)
    xs = [x + dx * c - dy * s for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    ys = [y + dx * s + dy * c for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    return [min(xs), min(ys), max(xs), max(ys)]


def _cvat(path: Path, report: ImportReport) -> list[_Image]:
    from grounding.formats.cvat import read_cvat

    try:
        records = read_cvat(path)
    except ValueError as exc:
        raise CorrectionsError(str(exc)) from None
    out = []
    for r in records:
        report.ignored_shapes += len(r.get("points") or []) + sum(
            (r.get("ignored") or {}).values())
        boxes = [(str(d.get("label") or ""), list(d["bbox"])) for d in r["detections"]]
        out.append(_Image(f"image {r['image']!r}", r["image"], None, r.get("width"),
                          r.get("height"), boxes))
    return out


def _coco(path: Path, report: ImportReport) -> list[_Image]:
    from grounding.formats.coco import load_coco
    from grounding.formats.dataset import DatasetError

    try:
        dataset = load_coco(path)
    except DatasetError as exc:
        raise CorrectionsError(str(exc)) from None
    for warning in dataset.warnings:
        _listed(report.skipped, warning)
    return [_Image(f"file_name {im.path!r}", im.path, None, im.width, im.height,
                   [(dataset.names[b.category_id], [b.x1, b.y1, b.x2, b.y2])
                    for b in im.boxes])
            for im in dataset.images]
