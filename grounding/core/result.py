"""The one result type: what a model found in one image, from backend to exporter."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, ClassVar

import numpy as np

from grounding.core.errors import GroundingError

Size = tuple[int, int]

_VIEWS: dict[str, Callable[..., Any]] = {}


def register_view(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Lend :class:`Result` a method from a higher layer (``annotate`` from
    grounding.pipeline.overlay, ``ask`` from grounding.pipeline.qa) without the record type
    importing it: the layers stay one-way. ``import grounding`` registers both."""
    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        _VIEWS[name] = function
        return function
    return register


def _view(name: str) -> Callable[..., Any]:
    try:
        return _VIEWS[name]
    except KeyError:
        raise GroundingError(f"Result.{name} is provided by grounding.pipeline; "
                             "`import grounding` registers it") from None


class InvalidResult(GroundingError, ValueError):
    """A box, point or record that cannot be part of a :class:`Result`; the message names
    the object (its label and coordinates, and in a record its place)."""


def finite_or_none(value: Any) -> Any:
    """``value`` made fit for strict JSON: every float that is not finite (NaN, ±inf,
    which ``json`` would write as the non-standard ``NaN``/``Infinity``) becomes None, in
    dicts, lists and tuples (made lists) at any depth; numpy scalars become Python ones.
    Everything else is returned as it is."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def _score(kind: str, label: str | None, score: Any) -> float | None:
    """A score as a float; None for None and for a score that is not finite (a NaN or an
    infinity says nothing about the object, and strict JSON cannot hold it)."""
    if score is None:
        return None
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise InvalidResult(f"{kind} {label!r}: score {score!r} is not a number") from None
    return value if math.isfinite(value) else None


def _coords(kind: str, label: str | None, values: Any, n: int) -> tuple[float, ...]:
    """``values`` as ``n`` finite floats, or :class:`InvalidResult` naming the object."""
    try:
        coords = tuple(map(float, values))
    except (TypeError, ValueError):
        coords = ()
    # A sum is finite only if every term is (NaN and ±inf propagate); a finite sum is one
    # test instead of n. Only a sum that overflows needs the term-by-term check.
    if len(coords) != n or not (math.isfinite(sum(coords))
                                or all(map(math.isfinite, coords))):
        raise InvalidResult(f"{kind} {label!r}: {values!r} is not {n} finite numbers")
    return coords


class _Located:
    """The record form shared by Box and Point: label, class, score, attributes, the
    coordinates under their own names (``bbox``/``model_bbox``, ``point``/``model_point``)
    and the label as the model wrote it, in the key order every record has.

    ``label`` is the class name when the object matched a class (also when the prompt
    asked for it by another phrase of an ontology); ``model_label`` is always the label
    exactly as the model wrote it (None in records written before it existed)."""

    _where: ClassVar[tuple[str, str]]

    def to_dict(self) -> dict[str, Any]:
        """The record entry; strict JSON (a score or a number in ``attributes`` that is
        not finite becomes None, see :func:`finite_or_none`)."""
        where, written = self._where
        raw = getattr(self, written)
        entry = {"label": self.label, "class_id": self.class_id,
                 where: list(getattr(self, where)), "score": finite_or_none(self.score),
                 "attributes": finite_or_none(self.attributes),
                 written: None if raw is None else finite_or_none(list(raw)),
                 "model_label": self.model_label}
        mask = getattr(self, "mask", None)
        if mask is not None:  # only boxes segmented with --masks carry one
            entry["mask"] = {"size": list(mask["size"]), "counts": mask["counts"]}
        return entry

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        where, written = cls._where
        raw = d.get(written)
        made = cls(d[where], d.get("label"), d.get("class_id"), d.get("score"),
                   dict(d.get("attributes") or {}),
                   None if raw is None else tuple(float(v) for v in raw),
                   d.get("model_label"))
        if d.get("mask") is not None:
            made.mask = dict(d["mask"])
        return made


@dataclass
class Box(_Located):
    """One box. Checked when made (also by :meth:`Result.copy`, :meth:`Result.filter` and
    :meth:`Result.from_record`): 4 finite numbers with x_min <= x_max and y_min <= y_max,
    stored as floats; anything else raises :class:`InvalidResult` (a ValueError). A score
    that is not finite (NaN, ±inf) is stored as None: unscored."""

    bbox: tuple[float, float, float, float]
    """x_min, y_min, x_max, y_max in pixels of the displayed original image."""
    label: str | None = None
    class_id: int | None = None
    score: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    model_bbox: tuple[float, ...] | None = None
    """The coordinates exactly as the model wrote them, in its own frame, for debugging
    (not checked: any corner order, as written)."""
    model_label: str | None = None
    """The label exactly as the model wrote it; ``label`` is the matched class's name."""
    mask: dict[str, Any] | None = None
    """With ``--masks``: the object's mask as COCO RLE (``{"size": [height, width],
    "counts": str}``, pycocotools' encoding) in the displayed image's frame, like
    ``bbox``; the segmenter's score is ``attributes["mask_score"]`` and the mask's area
    in pixels ``attributes["mask_area"]``. In the record only when set."""
    _where: ClassVar[tuple[str, str]] = ("bbox", "model_bbox")

    def __post_init__(self) -> None:
        bbox = self.bbox
        if type(bbox) is tuple and len(bbox) == 4:  # the usual case, checked in place:
            x1, y1, x2, y2 = bbox  # four floats in order with a finite sum (see _coords)
            if (type(x1) is float and type(y1) is float and type(x2) is float
                    and type(y2) is float and x1 <= x2 and y1 <= y2
                    and math.isfinite(x1 + y1 + x2 + y2)):
                if self.score is not None:
                    self.score = _score("box", self.label, self.score)
                return
        x1, y1, x2, y2 = _coords("box", self.label, self.bbox, 4)
        if x1 > x2 or y1 > y2:
            raise InvalidResult(f"box {self.label!r}: {self.bbox!r} is reversed; a bbox is "
                                "x_min, y_min, x_max, y_max with min <= max")
        self.bbox = (x1, y1, x2, y2)
        self.score = _score("box", self.label, self.score)


@dataclass
class Point(_Located):
    """One point: 2 finite numbers (x, y), stored as floats, or :class:`InvalidResult`.
    A score that is not finite is stored as None (as for :class:`Box`)."""

    point: tuple[float, float]
    label: str | None = None
    class_id: int | None = None
    score: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    model_point: tuple[float, ...] | None = None
    model_label: str | None = None
    _where: ClassVar[tuple[str, str]] = ("point", "model_point")

    def __post_init__(self) -> None:
        point = self.point
        if type(point) is tuple and len(point) == 2:  # the usual case, checked in place
            x, y = point
            if type(x) is float and type(y) is float and math.isfinite(x + y):
                if self.score is not None:
                    self.score = _score("point", self.label, self.score)
                return
        x, y = _coords("point", self.label, self.point, 2)
        self.point = (x, y)
        self.score = _score("point", self.label, self.score)


def _entries(record: dict[str, Any], key: str, make: Callable[[Any], Any]) -> list[Any]:
    """``record[key]`` made into Boxes or Points; a bad entry raises naming its place."""
    made = []
    for i, entry in enumerate(record.get(key) or []):
        try:
            made.append(make(entry))
        except InvalidResult as exc:
            raise InvalidResult(f"{record.get('image')}: {key}[{i}]: {exc}") from None
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            raise InvalidResult(f"{record.get('image')}: {key}[{i}]: {what} in {entry!r}"
                                ) from None
    return made


def score_at_least(threshold: float | None,
                   score: Callable[[Any], float | None] = attrgetter("score")
                   ) -> Callable[[Any], bool]:
    """A keep-predicate for :meth:`Result.filter`: true for a box or point whose ``score``
    (the detection score, or any other reader such as ``attributes["verify_score"]``) is
    at least ``threshold``, and for every unscored one (None: most VLM boxes carry no
    score, and a score that could not be read is no reason to drop); ``threshold`` None
    keeps everything. ``--min-score``, ``--verify`` and the exporters all use it."""
    def keep(obj: Any) -> bool:
        if threshold is None:
            return True
        value = score(obj)
        return value is None or float(value) >= threshold
    return keep


@dataclass
class Result:
    """Boxes and points found in one image.

    ``width``/``height`` are the displayed size (EXIF orientation applied) and every
    coordinate is in that frame; ``input_size`` is the model frame (width, height).
    When the image size is unknown (``grounding parse`` without sizes) coordinates stay
    in the model's frame and ``width``/``height`` are None.
    """

    boxes: list[Box] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    image: str | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    dialect: str | None = None
    input_size: Size | None = None
    raw: str = ""
    truncated: bool = False
    repetition: bool = False
    """The model's answer degenerated into repeating one object text (see
    grounding.core.repetition); what it wrote before is kept, the repeats are duplicates."""
    error: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    """Objects read but not kept, by reason: ``no_area`` (box empty after clipping),
    ``outside`` (point off the image), ``invalid`` (unusable coordinates), ``low_score``
    (below ``--min-score``), ``unverified`` (``--verify`` doubted them); :meth:`filter`
    is what counts them."""
    answers: list[dict[str, Any]] = field(default_factory=list)
    """Questions asked about the whole set of detections and the model's answers:
    ``[{"question": ..., "answer": ...}]`` (grounding.pipeline.qa); in the record only when any."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    """When the image was asked about in several requests (one per class with
    ``per_class``, one per tile with ``tiles``): each request's ``prompt``, ``raw`` answer,
    ``input_size``, ``tile`` (x_min, y_min, x_max, y_max of the crop in the displayed
    image, None for the whole image), ``class`` (the class asked for, None when all were),
    ``truncated`` and ``repetition``. ``raw`` is then empty and ``input_size`` None: each
    request has its own. In the record only when any."""
    classes: list[str] | None = None
    """The class names in id order (what ``class_id`` indexes) when the objects were
    matched against a class list; None when no class list was used (then every
    ``class_id`` is None) or the record predates this field."""
    # Runtime only, not part of the record:
    prompt: str | None = field(default=None, repr=False, compare=False)
    generation: Any = field(default=None, repr=False, compare=False)
    """The backend's Generation (token log-probabilities, timings) when a model ran."""
    _image: Any = field(default=None, repr=False, compare=False)

    def attach(self, image) -> Result:
        """Keep the (upright RGB) image so the result can draw itself."""
        self._image = image
        return self

    @property
    def attached_image(self):
        """The image given to :meth:`attach`, or None."""
        return self._image

    def copy(self) -> Result:
        """A copy whose box lists, attribute dicts and counters can change freely (the
        attached image and the generation are shared)."""
        return self._copy(self.boxes, self.points, self.dropped)

    def _copy(self, boxes: Sequence[Box], points: Sequence[Point],
              dropped: dict[str, int]) -> Result:
        return replace(
            self,
            boxes=[replace(b, attributes=dict(b.attributes)) for b in boxes],
            points=[replace(p, attributes=dict(p.attributes)) for p in points],
            dropped=dict(dropped),
            answers=[dict(a) for a in self.answers],
            requests=[dict(r) for r in self.requests],
            classes=None if self.classes is None else list(self.classes),
        )

    def filter(self, keep_box: Callable[[Box], bool] | None = None,
               keep_point: Callable[[Point], bool] | None = None, *, reason: str) -> Result:
        """Drop and count, the one way grounding removes objects: a copy (as :meth:`copy`;
        this result is left as it is) holding the boxes for which ``keep_box`` is true and
        the points for which ``keep_point`` is true (None keeps them all), in order, with
        the number removed added to ``dropped[reason]`` (no entry when none was)::

            result.filter(keep_box=lambda b: b.label == "cat", reason="not_a_cat")
            result.filter(score_at_least(0.3), score_at_least(0.3), reason="low_score")
        """
        if not reason:
            raise ValueError("filter needs a reason: the key its count goes under in dropped")
        boxes = self.boxes if keep_box is None else [b for b in self.boxes if keep_box(b)]
        points = self.points if keep_point is None else [p for p in self.points
                                                          if keep_point(p)]
        removed = len(self.boxes) - len(boxes) + len(self.points) - len(points)
        dropped = dict(self.dropped)
        if removed:
            dropped[reason] = dropped.get(reason, 0) + removed
        return self._copy(boxes, points, dropped)

    def annotate(self, image=None):
        """The overlay as a PIL image: boxes, labels and points on ``image`` (or the
        attached one)."""
        image = image if image is not None else self._image
        if image is None:
            raise ValueError("no image attached: pass the image to annotate()")
        return _view("annotate")(image, self)

    def _repr_png_(self) -> bytes | None:
        """Jupyter shows a result as its overlay."""
        if self._image is None:
            return None
        import io

        buffer = io.BytesIO()
        self.annotate().save(buffer, format="PNG")
        return buffer.getvalue()

    @property
    def image_size(self) -> Size | None:
        return None if self.width is None or self.height is None else (self.width, self.height)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def labels(self) -> list[str | None]:
        return [b.label for b in self.boxes]

    # Box and point views, one row per box / point in order, float64; every exporter
    # writes from these (ultralytics' Results.boxes.xyxy / xywh / xywhn).

    @property
    def xyxy(self) -> np.ndarray:
        """(n, 4) x_min, y_min, x_max, y_max in pixels (supervision, torchvision)."""
        return np.array([b.bbox for b in self.boxes], dtype=np.float64).reshape(-1, 4)

    @property
    def xywh(self) -> np.ndarray:
        """(n, 4) x_min, y_min, width, height in pixels: COCO's ``bbox``."""
        xyxy = self.xyxy
        return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)

    @property
    def xywhn(self) -> np.ndarray:
        """(n, 4) centre x, centre y, width, height as fractions of the image size: a
        YOLO label row. Needs ``width``/``height``."""
        xyxy = self.xyxy
        centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
        return np.concatenate([centre, xyxy[:, 2:] - xyxy[:, :2]], axis=1) / self._size(
            "xywhn", 4)

    @property
    def xywh_percent(self) -> np.ndarray:
        """(n, 4) x_min, y_min, width, height in percent of the image size: Label Studio's
        rectangle. Needs ``width``/``height``."""
        return 100 * self.xywh / self._size("xywh_percent", 4)

    @property
    def points_xy(self) -> np.ndarray:
        """(m, 2) x, y of the points in pixels."""
        return np.array([p.point for p in self.points], dtype=np.float64).reshape(-1, 2)

    @property
    def points_percent(self) -> np.ndarray:
        """(m, 2) x, y of the points in percent of the image size: Label Studio's keypoint.
        Needs ``width``/``height``."""
        return 100 * self.points_xy / self._size("points_percent", 2)

    def _size(self, view: str, n: int) -> np.ndarray:
        """width, height repeated to ``n`` columns, to divide a view by."""
        if self.width is None or self.height is None:
            raise ValueError(f"Result.{view} needs the image size; this result has none "
                             "(its coordinates are in the model's frame)")
        return np.array([self.width, self.height] * (n // 2), dtype=np.float64)

    def to_record(self) -> dict[str, Any]:
        """The JSON record every grounding command reads and writes. It is strict JSON:
        a number that is not finite (in ``attributes`` or ``answers``; coordinates and
        scores cannot hold one) is written as null, never as ``NaN``/``Infinity``."""
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "model": self.model,
            "dialect": self.dialect,
            "input_size": None if self.input_size is None else list(self.input_size),
            "classes": None if self.classes is None else list(self.classes),
            "detections": [b.to_dict() for b in self.boxes],
            "points": [p.to_dict() for p in self.points],
            "raw": self.raw,
            "truncated": self.truncated,
            "repetition": self.repetition,
            "error": self.error,
            "dropped": dict(self.dropped),
        } | ({"answers": finite_or_none(self.answers)} if self.answers else {}) | (
            {"requests": finite_or_none(self.requests)} if self.requests else {})

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_record` as strict JSON (``allow_nan=False``)."""
        kwargs.setdefault("ensure_ascii", False)
        kwargs.setdefault("allow_nan", False)
        return json.dumps(self.to_record(), **kwargs)

    @property
    def uses_classes(self) -> bool:
        """True when the objects were matched against a class list (:attr:`classes`);
        for a record written before that field, when any object has a ``class_id``."""
        return self.classes is not None or any(
            o.class_id is not None for o in (*self.boxes, *self.points))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Result:
        """The Result a record holds; :class:`InvalidResult` (a ValueError) names the image
        and the entry when a box or point is malformed (missing, not finite, reversed)."""
        size = record.get("input_size")
        classes = record.get("classes")
        if classes is not None and not isinstance(classes, list):
            raise InvalidResult(f"{record.get('image')}: classes must be a list of names, "
                                f"not {classes!r}")
        return cls(
            boxes=_entries(record, "detections", Box.from_dict),
            points=_entries(record, "points", Point.from_dict),
            image=record.get("image"),
            width=record.get("width"),
            height=record.get("height"),
            model=record.get("model"),
            dialect=record.get("dialect"),
            input_size=None if size is None else (int(size[0]), int(size[1])),
            raw=record.get("raw") or "",
            truncated=bool(record.get("truncated")),
            repetition=bool(record.get("repetition")),
            error=record.get("error"),
            dropped=dict(record.get("dropped") or {}),
            answers=[dict(a) for a in record.get("answers") or []],
            requests=[dict(r) for r in record.get("requests") or []],
            classes=None if classes is None else [str(c) for c in classes],
        )

    @classmethod
    def from_json(cls, text: str) -> Result:
        return cls.from_record(json.loads(text))

    def ask(self, question: str, backend, *, about: str = "each", image=None, **options
            ) -> Result:
        """Ask ``backend`` a question about each detection (``about="each"``: answers land
        in the boxes' attributes) or about the whole numbered set (``about="all"``: the
        answer is appended to ``answers``); returns the updated copy. See grounding.pipeline.qa."""
        return _view("ask")(self, image, backend, question, about=about, **options)

    def to_detections(self):
        """As ``supervision.Detections``; labels in ``data["class_name"]``; ``mask``
        (n, height, width) when every box has one (``--masks``).

        ``class_id`` is the matched class id, -1 for labels outside the class list (also
        when no label matched at all); when no class list was used (:attr:`uses_classes`),
        ids number the distinct labels in order of appearance so annotators still colour
        each label apart.
        """
        import supervision as sv

        n = len(self.boxes)
        names = np.array([b.label or "" for b in self.boxes], dtype=object)
        ids = self.class_ids(self.boxes)
        scores = [b.score for b in self.boxes]
        masks = None
        if n and all(b.mask is not None for b in self.boxes):
            from grounding.core.masks import decode

            masks = np.stack([decode(b.mask) for b in self.boxes])
        return sv.Detections(
            xyxy=self.xyxy.astype(np.float32),
            mask=masks,
            class_id=np.array(ids, dtype=int).reshape(n),
            confidence=None if n == 0 or any(s is None for s in scores)
            else np.array(scores, dtype=np.float32),
            data={"class_name": names},
        )

    def class_ids(self, objects: Sequence[Box | Point]) -> list[int]:
        """The ids :meth:`to_detections` gives ``objects`` (boxes or points of this
        result): the class id, -1 for no class, when :attr:`uses_classes`; else the
        number of each distinct label in order of appearance over the boxes, then the
        points, so a box and a point with the same label get the same id."""
        if self.uses_classes:
            return [-1 if o.class_id is None else int(o.class_id) for o in objects]
        labels = [o.label or "" for o in (*self.boxes, *self.points)]
        order = {name: i for i, name in enumerate(dict.fromkeys(labels))}
        return [order.get(o.label or "", len(order)) for o in objects]
