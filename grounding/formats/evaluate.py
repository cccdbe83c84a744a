"""Score labelling records against ground truth: COCO mAP plus precision/recall per class,
and with ``sweep_scores=True`` precision/recall/F1 per score threshold (``formats.sweep``).

mAP comes from pycocotools' COCOeval (bbox, or segm for masks: ``iou_type="segm"``),
the reference every detector reports against. Precision and recall at IoU 0.5 come
from a greedy one-to-one match by score, because a VLM's boxes mostly carry no score
(null counts as 1.0): AP ranks boxes by score, so for unscored boxes the operating point
(how many found, how many wrong) says more than the area under a curve that has a single point.

Only images present on both sides are scored: a ground-truth image without a record was
never labelled, and a record without ground truth cannot be judged; both are counted.
Ground-truth categories are mapped to grounding's classes by name, ignoring case; those
that match no class are listed and left out, as are classes the ground truth lacks.

The ground truth is read by ``formats.coco.load_coco``, ``formats.yolo.load_yolo``,
supervision's Pascal VOC reader, or from a run's reviewed corrections (``load_corrections``:
see :func:`load_ground_truth` for why COCO and YOLO keep grounding's readers); entries they
reject as malformed are counted in ``EvalReport.gt_skipped`` and described,
with the file and the annotation or line, in ``EvalReport.gt_warnings``. A ground truth
left with no image or no box (empty, or every entry malformed) cannot score anything:
:class:`~grounding.formats.dataset.DatasetError` naming the file. A malformed record
(a box that is not 4 finite ordered numbers, a class_id that is not a whole number)
raises :class:`~grounding.core.result.InvalidResult` naming its image.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from grounding.core.result import InvalidResult, Result
from grounding.formats import segmentation
from grounding.formats.coco import load_coco
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
from grounding.formats.sweep import Sweep, sweep
from grounding.formats.sweep import box_ioa as _ioa
from grounding.formats.sweep import box_iou as _iou
from grounding.formats.yolo import load_yolo
from grounding.io.images import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # still importable here
from grounding.io.records import latest_lines

IOU = 0.5
IOU_TYPES = ("bbox", "segm")
MAX_LISTED = 20


@dataclass
class ClassReport:
    name: str
    class_id: int
    in_gt: bool
    """False when the ground truth has no category of this name: nothing to score."""
    gt: int = 0
    predicted: int = 0
    true_positives: int = 0
    ap50: float | None = None
    ap50_95: float | None = None
    precision: float | None = None
    recall: float | None = None


@dataclass
class EvalReport:
    map50: float | None
    map50_95: float | None
    precision: float | None
    """All scored classes pooled, at IoU 0.5."""
    recall: float | None
    classes: list[ClassReport]
    images_matched: int
    gt_images_unmatched: int
    """Ground-truth images with no record (never labelled, or labelled with an error)."""
    records_unmatched: int
    """Records whose image is not in the ground truth (or duplicates a matched one)."""
    records_skipped: int
    """Records with an error or without a size."""
    size_mismatches: int
    """Matched images whose record size differs from the ground truth's: left out."""
    predictions_without_class: int
    gt_classes_not_in_list: list[str]
    classes_not_in_gt: list[str]
    examples: list[str] = field(default_factory=list)
    """A few unmatched or mismatched paths, to see what went wrong."""
    gt_skipped: int = 0
    """Ground-truth entries (annotations, images, label lines, ...) left out as malformed."""
    gt_warnings: list[str] = field(default_factory=list)
    """Why, for the first of them: ``"FILE: WHERE: REASON"`` (see ``formats.dataset``)."""
    iou_type: str = "bbox"
    """``"bbox"``: boxes scored by box IoU; ``"segm"``: masks by mask IoU."""
    predictions_without_mask: int = 0
    """``segm``: boxes of matched records that carry no mask, left out."""
    sweeps: list[Sweep] = field(default_factory=list)
    """With ``sweep=True``: precision, recall and F1 per threshold of the box score, and of
    the verify score when a box carries one (``formats.sweep``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self):
        """A rich Table: one row per class, then all classes."""
        from rich.table import Table

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        title = "Mask quality" if self.iou_type == "segm" else "Detection quality"
        table = Table(title=title, caption=(
            f"{self.images_matched} images scored, {self.gt_images_unmatched} ground-truth "
            f"images without a record, {self.records_unmatched} records without ground "
            f"truth, {self.records_skipped} records skipped, {self.size_mismatches} size "
            "mismatches" + (f", {self.gt_skipped} malformed ground-truth entries left out"
                            if self.gt_skipped else "")))
        for name in ("class", "GT", "pred", "AP50", "AP50:95", "P@.5", "R@.5"):
            table.add_column(name, justify="left" if name == "class" else "right")
        for c in self.classes:
            name = c.name if c.in_gt else f"{c.name} (not in GT)"
            table.add_row(name, str(c.gt), str(c.predicted), f(c.ap50), f(c.ap50_95),
                          f(c.precision), f(c.recall))
        table.add_row("all", str(sum(c.gt for c in self.classes)),
                      str(sum(c.predicted for c in self.classes)), f(self.map50),
                      f(self.map50_95), f(self.precision), f(self.recall), style="bold")
        for name in self.gt_classes_not_in_list:
            table.add_row(f"{name} (GT only)", "-", "-", "-", "-", "-", "-", style="dim")
        return table


@dataclass
class _Image:
    relative: str
    width: int
    height: int
    boxes: list[tuple[Any, ...]] = field(default_factory=list)
    """class index, x1, y1, x2, y2, iscrowd, and for ``segm`` the mask as pycocotools RLE"""


def evaluate(records: Iterable[dict[str, Any]], class_names: list[str], gt: Path | Dataset,
             *, images_root: Path | None = None, iou_type: str = "bbox",
             sweep_scores: bool = False,
             target_precision: float | None = None) -> EvalReport:
    """Score ``records`` against ``gt``: a COCO json file, a YOLO dataset directory
    (``data.yaml``, ``images/``, ``labels/``), a Pascal VOC directory (``Annotations/``,
    ``JPEGImages/``), or a :class:`Dataset` already read (``load_corrections``).
    ``images_root`` turns absolute image paths (in records or COCO ``file_name``) into the
    relative ones matching uses.

    ``sweep_scores=True`` adds :attr:`EvalReport.sweeps`: precision, recall and F1 at IoU
    0.5 for every threshold of the box score and, when boxes carry one, of the verify
    score (``attributes["verify_score"]``), with the best-F1 threshold and the lowest
    meeting ``target_precision`` (``formats.sweep``; same images, classes and matching as
    the precision and recall above).

    ``iou_type="segm"`` scores the boxes' masks (``--masks``) against a COCO ground truth's
    ``segmentation`` (polygons or RLE) by mask IoU, with pycocotools' COCOeval ``segm``
    and the same greedy match for precision and recall. Ground-truth annotations without
    a usable segmentation are left out as malformed, boxes without a mask are left out
    and counted (``predictions_without_mask``); a ground truth with no segmentation at
    all, a YOLO folder, or records whose boxes carry no mask raise (DatasetError for the
    ground truth, ValueError for the records)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    segm = iou_type == "segm"
    names = [str(n) for n in class_names]
    root = None if images_root is None else Path(images_root)
    data = gt if isinstance(gt, Dataset) else load_ground_truth(Path(gt), root, segm=segm)
    if segm:
        data = _with_segmentation(data)
    check_usable(data)
    gt_names = data.names
    index = {n.lower(): i for i, n in enumerate(names)}
    gt_to_class = {g: index.get(n.lower()) for g, n in gt_names.items()}
    in_gt = {c for c in gt_to_class.values() if c is not None}
    gt_images = [_Image(im.path, im.width, im.height,
                        [(c, b.x1, b.y1, b.x2, b.y2, b.iscrowd, b.segmentation)
                         for b in im.boxes
                         if (c := gt_to_class.get(b.category_id)) is not None])
                 for im in data.images]

    find = _Matcher(gt_images)
    preds: dict[int, list[tuple[int, float, float, float, float, float]]] = {}
    raw: dict[int, list[tuple[float | None, float | None]]] = {}
    """Beside each of preds[g]: its score and verify score as the record has them."""
    skipped = unmatched = mismatched = without_class = without_mask = 0
    seen_box = seen_mask = False
    examples: list[str] = []
    for record in records:
        if record.get("error") or record.get("width") is None:
            skipped += 1
            continue
        relative = relative_path(str(record.get("image") or ""), root)
        g = find(relative)
        if g is None or g in preds:
            unmatched += 1
            _note(examples, f"no ground truth for {relative}")
            continue
        image = gt_images[g]
        if (int(record["width"]), int(record["height"])) != (image.width, image.height):
            mismatched += 1
            _note(examples, f"{relative}: record {record['width']}x{record['height']}, "
                            f"ground truth {image.width}x{image.height}")
            preds[g] = []
            find.exclude(g)
            continue
        boxes = []
        for b in Result.from_record(record).boxes:  # checked: finite, ordered
            seen_box = True
            seen_mask = seen_mask or b.mask is not None
            if b.class_id is None:
                without_class += 1
                continue
            class_id = as_int(b.class_id)
            if class_id is None:
                raise InvalidResult(f"{record.get('image')}: box {b.label!r}: class_id "
                                    f"{b.class_id!r} is not a whole number")
            mask = None
            if segm:
                if b.mask is None:
                    without_mask += 1
                    continue
                try:
                    mask = segmentation.check_mask(b.mask, image.width, image.height,
                                                   f"{record.get('image')}: box {b.label!r}")
                except ValueError as exc:
                    raise InvalidResult(str(exc)) from None
            boxes.append((class_id, *b.bbox, 1.0 if b.score is None else b.score, mask))
            raw.setdefault(g, []).append((b.score, as_number(b.attributes.get("verify_score"))))
        preds[g] = boxes
    if segm and seen_box and not seen_mask:
        raise ValueError("the records' boxes carry no masks: mask evaluation (segm) needs "
                         "a run labelled with --masks")
    matched = [g for g in preds if not find.excluded(g)]
    reports = [ClassReport(n, i, i in in_gt) for i, n in enumerate(names)]
    for g in matched:
        for b in gt_images[g].boxes:
            reports[b[0]].gt += 0 if b[5] else 1
        for p in preds[g]:
            if 0 <= p[0] < len(names):
                reports[p[0]].predicted += 1
    scored = sorted(in_gt)
    map50, map50_95 = _coco_eval(gt_images, preds, matched, scored, reports, iou_type)
    tp = fp = n_gt = 0
    for c in scored:
        c_tp, c_fp = _greedy(gt_images, preds, matched, c, segm=segm)
        r = reports[c]
        r.true_positives = c_tp
        r.precision = c_tp / (c_tp + c_fp) if c_tp + c_fp else None
        r.recall = c_tp / r.gt if r.gt else None
        tp, fp, n_gt = tp + c_tp, fp + c_fp, n_gt + r.gt
    sweeps = (_sweeps(gt_images, preds, raw, matched, set(scored), segm, target_precision)
              if sweep_scores else [])
    for g in range(len(gt_images)):
        if g not in preds:
            _note(examples, f"no record for ground-truth image {gt_images[g].relative}")
    return EvalReport(
        map50=map50, map50_95=map50_95,
        precision=tp / (tp + fp) if tp + fp else None, recall=tp / n_gt if n_gt else None,
        classes=reports, images_matched=len(matched),
        gt_images_unmatched=len(gt_images) - len(preds), records_unmatched=unmatched,
        records_skipped=skipped, size_mismatches=mismatched,
        predictions_without_class=without_class,
        gt_classes_not_in_list=sorted({gt_names[g] for g, c in gt_to_class.items() if c is None}),
        classes_not_in_gt=[n for i, n in enumerate(names) if i not in in_gt],
        examples=examples, gt_skipped=data.skipped, gt_warnings=data.warnings,
        iou_type=iou_type, predictions_without_mask=without_mask, sweeps=sweeps)


def _sweeps(gt_images: list[_Image], preds: dict[int, list], raw: dict[int, list],
            matched: list[int], scored: set[int], segm: bool,
            target_precision: float | None) -> list[Sweep]:
    """The box-score sweep, and the verify-score one when any box carries that score."""
    where = (lambda b: b[6]) if segm else (lambda b: tuple(b[1:5]))
    iou, ioa = (_mask_iou, _mask_ioa) if segm else (_iou, _ioa)
    truth = {g: [(b[0], where(b), bool(b[5])) for b in gt_images[g].boxes if b[0] in scored]
             for g in matched}
    out = []
    for k, name in enumerate(("score", "verify_score")):
        found = {g: [(p[0], where(p), s[k]) for p, s in zip(preds[g], raw.get(g, []), strict=True)
                     if p[0] in scored] for g in matched}
        if k and all(s is None for ps in found.values() for _, _, s in ps):
            continue  # no box was verified: no verify sweep
        out.append(sweep(((truth[g], found[g]) for g in matched), score=name,
                         target_precision=target_precision, iou=iou, ioa=ioa))
    return out


# --- Ground truth --------------------------------------------------------------------------


def load_ground_truth(gt: Path, images_root: Path | None = None, *,
                      segm: bool = False) -> Dataset:
    """``gt`` read by its shape: a folder with ``Annotations/`` is Pascal VOC, any other
    folder YOLO, a file COCO.

    VOC is read by supervision's ``DetectionDataset.from_pascal_voc``. COCO and YOLO keep
    grounding's own readers (``load_coco``, ``load_yolo``), because supervision's (0.31)
    cannot do what evaluation relies on: both raise on the first malformed entry instead of
    leaving it out with a reason (``EvalReport.gt_skipped`` / ``gt_warnings``);
    ``from_coco`` drops the dataset's category ids, refuses absolute ``file_name`` paths
    and images it cannot find, and rasterises every segmentation into full-size masks where
    ``segm`` wants the RLE; ``from_yolo`` reads one flat folder (not ``images/train/...``,
    the layout grounding's YOLO export writes) and rasterises polygon rows into masks."""
    if gt.is_dir():
        if segm:
            raise DatasetError(f"{gt}: mask evaluation (segm) needs a COCO json ground "
                               "truth with segmentation, not a folder")
        if (gt / "Annotations").is_dir():
            return load_voc_supervision(gt)
        return load_yolo(gt)
    return load_coco(gt, images_root)


def load_voc_supervision(root: Path) -> Dataset:
    """A Pascal VOC folder (``Annotations/*.xml`` beside ``JPEGImages/``) through
    supervision's ``DetectionDataset.from_pascal_voc``: boxes as it reads them (VOC's
    1-based ``xmin``/``ymin`` shifted to 0-based pixel edges), class ids in the order names
    first appear, an image without an xml file as an image with no object. Supervision
    reads the images, not the xml, so ``JPEGImages/`` must hold them; it decodes each
    annotated one in full (slow for thousands of large images, fine for an evaluation
    set). ``difficult`` objects count like any other (supervision does not read the flag).
    Sizes are the images' as displayed (EXIF applied, read from the header), the frame of
    the records. An xml or image supervision cannot read makes the folder unusable:
    :class:`DatasetError` with its reason."""
    import supervision as sv

    from grounding.io.images import displayed_size

    images_dir = root / "JPEGImages"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: a Pascal VOC folder needs JPEGImages/ beside "
                           "Annotations/ (supervision's reader takes the images from there)")
    try:
        ds = sv.DetectionDataset.from_pascal_voc(str(images_dir), str(root / "Annotations"))
    except (ValueError, SyntaxError, OSError, KeyError, TypeError) as exc:
        raise DatasetError(f"{root}: not a usable Pascal VOC folder: "
                           f"{type(exc).__name__}: {exc}") from None
    out = Dataset(str(root), dict(enumerate(str(n) for n in ds.classes)))
    for path in ds.image_paths:
        try:
            w, h = displayed_size(path)
        except (OSError, SyntaxError, ValueError) as exc:
            out.skip(str(path), f"cannot read the image ({exc}); left out")
            continue
        image = DatasetImage(Path(path).relative_to(images_dir).as_posix(), w, h)
        det = ds.annotations[path]
        ids = det.class_id if det.class_id is not None else [None] * len(det)
        for (x1, y1, x2, y2), c in zip(det.xyxy.tolist(), ids, strict=True):
            if c is None:
                out.skip(f"{path}", "an object without a class name; left out")
                continue
            image.boxes.append(DatasetBox(int(c), float(x1), float(y1), float(x2), float(y2)))
        out.images.append(image)
    return out


def load_corrections(path: Path, class_names: list[str]) -> Dataset:
    """The reviewed boxes of a run (``RUN_DIR/corrections.jsonl``, written by ``grounding
    import-corrections``) as ground truth: one JSON object a line, ``{"image": the run's
    record key, "width", "height", "detections": [{"label", "class_id", "bbox"}], "reviewed":
    true, ...}``; the last line of an image wins, and an image whose last line says
    ``"reviewed": false`` is left out. A box's class is its ``class_id`` when that is one of
    ``class_names``, else its label by name (ignoring case); a label that is no class is
    kept under a category of its own (reported as a ground-truth class not in the list).
    Malformed lines and boxes are left out with a reason, as the other readers do. The
    images' paths are the records' keys (as POSIX, like ``evaluate`` reads records): match
    the records unchanged, with no ``images_root``."""
    names = [str(n) for n in class_names]
    out = Dataset(str(path), dict(enumerate(names)))
    index = {n.lower(): i for i, n in enumerate(names)}
    last, bad = latest_lines(path)
    for number, problem in bad:
        out.skip(f"{path}:{number}", f"not JSON: {problem}" if isinstance(problem, ValueError)
                 else f"no \"image\" key: {show(problem)}")
    for image, (number, entry) in last.items():
        if entry.get("reviewed") is False:
            continue
        where = f"{path}:{number}"
        w, h = as_int(entry.get("width")), as_int(entry.get("height"))
        dets = entry.get("detections")
        if w is None or h is None or w <= 0 or h <= 0:
            out.skip(where, f"width and height must be whole numbers > 0, got "
                            f"{show(entry.get('width'))} x {show(entry.get('height'))}")
            continue
        if not isinstance(dets, list):
            out.skip(where, f"detections must be a list, got {show(dets)}")
            continue
        kept = DatasetImage(relative_path(image, None), w, h)  # as records are read
        for i, det in enumerate(dets):
            reason, box = _correction_box(det, names, index, out.names)
            if box is None:
                out.skip(f"{where}: detections[{i}]", reason)
            else:
                kept.boxes.append(box)
        out.images.append(kept)
    return out


def _correction_box(det: Any, names: list[str], index: dict[str, int],
                    categories: dict[int, str]) -> tuple[str, DatasetBox | None]:
    if not isinstance(det, dict):
        return f"not an object: {show(det)}", None
    bbox = det.get("bbox")
    values = [as_number(v) for v in bbox] if isinstance(bbox, list | tuple) else []
    if len(values) != 4 or None in values or values[0] > values[2] or values[1] > values[3]:
        return f"bbox must be 4 numbers x1 <= x2, y1 <= y2, got {show(bbox)}", None
    class_id = as_int(det.get("class_id"))
    if class_id is None or not 0 <= class_id < len(names):
        label = det.get("label")
        if not isinstance(label, str) or not label:
            return (f"class_id {show(det.get('class_id'))} is not a class and there is no "
                    "label"), None
        class_id = index.get(label.lower())
        if class_id is None:  # a class the run was not asked for: a category of its own
            class_id = next((k for k, n in categories.items() if n == label), None)
            if class_id is None:
                class_id = max(categories, default=-1) + 1
                categories[class_id] = label
    return "", DatasetBox(class_id, *values)


def _with_segmentation(data: Dataset) -> Dataset:
    """The ground truth for ``segm``: each box's segmentation as pycocotools RLE; boxes
    without a usable one are left out as malformed. DatasetError when none has one."""
    from pycocotools import mask as mask_utils

    out = Dataset(data.source, data.names, skipped=data.skipped,
                  warnings=list(data.warnings))
    found = False
    for im in data.images:
        kept = DatasetImage(im.path, im.width, im.height)
        for i, b in enumerate(im.boxes):
            where = f"{data.source}: {im.path}: box {i}"
            seg = b.segmentation
            if seg is None:
                out.skip(where, "no segmentation (polygons or RLE): left out of segm")
                continue
            try:
                if isinstance(seg, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, im.height, im.width))
                elif isinstance(seg["counts"], list):
                    rle = mask_utils.frPyObjects(seg, *seg["size"])
                else:
                    rle = {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}
                if [int(v) for v in rle["size"]] != [im.height, im.width]:
                    raise ValueError(f"size {list(rle['size'])} is not the image's "
                                     f"{[im.height, im.width]} (height, width)")
                mask_utils.area(rle)  # a corrupt counts string fails here, not in COCOeval
            except (ValueError, TypeError, UnicodeEncodeError) as exc:
                out.skip(where, f"unusable segmentation ({exc}): left out of segm")
                continue
            found = True
            kept.boxes.append(b._replace(segmentation=rle))
        out.images.append(kept)
    if not found and any(im.boxes for im in data.images):
        raise DatasetError(f"{data.source}: no annotation has a segmentation (polygons or "
                           "RLE); mask evaluation (segm) needs one, use --iou-type bbox")
    return out


def check_usable(data: Dataset) -> None:
    """:class:`DatasetError` naming the file when the ground truth has no image or no box
    left to score against, with what was left out as malformed and why."""
    what = ("no images" if not data.images
            else "no annotations" if not any(im.boxes for im in data.images) else None)
    if what is None:
        return
    why = ""
    if data.skipped:
        first = data.warnings[0] if data.warnings else "?"
        why = (f" ({data.skipped} malformed "
               f"{'entry' if data.skipped == 1 else 'entries'} left out, the first: {first})")
    raise DatasetError(f"{data.source}: the ground truth has {what}{why}; there is "
                       "nothing to evaluate against")


def _note(examples: list[str], text: str) -> None:
    if len(examples) < MAX_LISTED:
        examples.append(text)


class _Matcher:
    """Ground-truth image for a record path: the exact relative path, then the path under
    a split folder (YOLO images/train/...), then the flattened name grounding's YOLO
    export writes (a/b.jpg -> a__b.jpg), then the bare file name; a name shared by two
    ground-truth images is never used."""

    def __init__(self, images: list[_Image]) -> None:
        self.by_path: dict[str, int] = {}
        self.by_sub: dict[str, int | None] = {}
        self.by_name: dict[str, int | None] = {}
        self._excluded: set[int] = set()
        for g, image in enumerate(images):
            parts = PurePosixPath(image.relative).parts
            self.by_path.setdefault(image.relative, g)
            if len(parts) > 1:
                sub = "/".join(parts[1:])
                self.by_sub[sub] = None if sub in self.by_sub else g
            self.by_name[parts[-1]] = None if parts[-1] in self.by_name else g

    def __call__(self, relative: str) -> int | None:
        for key, table in ((relative, self.by_path), (relative, self.by_sub),
                           (relative.replace("/", "__"), self.by_name),
                           (PurePosixPath(relative).name, self.by_name)):
            g = table.get(key)
            if g is not None:
                return g
        return None

    def exclude(self, g: int) -> None:
        self._excluded.add(g)

    def excluded(self, g: int) -> bool:
        return g in self._excluded


def _coco_eval(gt_images: list[_Image], preds: dict[int, list], matched: list[int],
               scored: list[int], reports: list[ClassReport],
               iou_type: str = "bbox") -> tuple[float | None, float | None]:
    """COCOeval (``iou_type`` bbox or segm) over the matched images and the classes both
    sides know; fills the per-class AP in ``reports`` and returns (mAP@50, mAP@50:95)."""
    if not matched or not scored:
        return None, None
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    categories = [{"id": c + 1, "name": str(c)} for c in scored]
    images = [{"id": g + 1, "width": gt_images[g].width, "height": gt_images[g].height}
              for g in matched]
    truth, found = [], []
    most, known = 0, set(scored)
    for g in matched:
        for c, x1, y1, x2, y2, crowd, seg in gt_images[g].boxes:
            truth.append({"id": len(truth) + 1, "image_id": g + 1, "category_id": c + 1,
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                          "iscrowd": int(crowd)})
            if iou_type == "segm":
                truth[-1].update(segmentation=seg, area=float(mask_utils.area(seg)))
        kept = [p for p in preds[g] if p[0] in known]
        most = max(most, len(kept))
        for c, x1, y1, x2, y2, score, mask in kept:
            found.append({"id": len(found) + 1, "image_id": g + 1, "category_id": c + 1,
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                          "iscrowd": 0, "score": score})
            if iou_type == "segm":
                found[-1].update(segmentation=mask, area=float(mask_utils.area(mask)))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": truth}
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": found}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = [g + 1 for g in matched]
        ev.params.catIds = [c + 1 for c in scored]
        # Never cut a VLM's answer at COCO's 100 boxes per image.
        ev.params.maxDets = [1, 10, max(100, most)]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU, recall, class], area all
    for k, c in enumerate(scored):
        reports[c].ap50 = _mean(precision[0, :, k])
        reports[c].ap50_95 = _mean(precision[:, :, k])
    return _mean(precision[0]), _mean(precision)


def _mean(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _greedy(gt_images: list[_Image], preds: dict[int, list], matched: list[int],
            c: int, *, segm: bool = False) -> tuple[int, int]:
    """(true positives, false positives) of class ``c`` at IoU >= 0.5 (mask IoU for
    ``segm``): boxes taken in score order, each to the unmatched ground truth it overlaps
    most. A box on a crowd region is neither (as in COCO)."""
    tp = fp = 0
    where = (lambda b: b[6]) if segm else (lambda b: b[1:5])
    iou, ioa = (_mask_iou, _mask_ioa) if segm else (_iou, _ioa)
    for g in matched:
        truth = [where(b) for b in gt_images[g].boxes if b[0] == c and not b[5]]
        crowd = [where(b) for b in gt_images[g].boxes if b[0] == c and b[5]]
        found = sorted((p for p in preds[g] if p[0] == c), key=lambda p: -p[5])
        taken: set[int] = set()
        for p in found:
            ious = iou(where(p), truth)
            best, best_iou = -1, IOU
            for j, v in enumerate(ious):
                if j not in taken and v >= best_iou:
                    best, best_iou = j, v
            if best >= 0:
                taken.add(best)
                tp += 1
            elif not any(ioa(where(p), r) >= IOU for r in crowd):
                fp += 1
    return tp, fp


def _mask_iou(mask: dict[str, Any], others: list[dict[str, Any]]) -> list[float]:
    from pycocotools import mask as mask_utils

    if not others:
        return []
    return [float(v) for v in np.asarray(mask_utils.iou([mask], others, [0] * len(others)))
            .reshape(-1)]


def _mask_ioa(mask: dict[str, Any], region: dict[str, Any]) -> float:
    """Intersection over the mask's area (pycocotools' crowd IoU)."""
    from pycocotools import mask as mask_utils

    return float(np.asarray(mask_utils.iou([mask], [region], [1])).reshape(-1)[0])
