"""The one result type: what a model found in one image, from backend to exporter."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

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


@dataclass
class Box:
    bbox: tuple[float, float, float, float]
    """x_min, y_min, x_max, y_max in pixels of the displayed original image."""
    label: str | None = None
    class_id: int | None = None
    score: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    model_bbox: tuple[float, ...] | None = None
    """The coordinates exactly as the model wrote them, in its own frame, for debugging."""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "class_id": self.class_id, "bbox": list(self.bbox),
                "score": self.score, "attributes": self.attributes,
                "model_bbox": None if self.model_bbox is None else list(self.model_bbox)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Box:
        mb = d.get("model_bbox")
        return cls(tuple(float(v) for v in d["bbox"]), d.get("label"), d.get("class_id"),
                   d.get("score"), dict(d.get("attributes") or {}),
                   None if mb is None else tuple(float(v) for v in mb))


@dataclass
class Point:
    point: tuple[float, float]
    label: str | None = None
    class_id: int | None = None
    score: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    model_point: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "class_id": self.class_id, "point": list(self.point),
                "score": self.score, "attributes": self.attributes,
                "model_point": None if self.model_point is None else list(self.model_point)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        mp = d.get("model_point")
        return cls(tuple(float(v) for v in d["point"]), d.get("label"), d.get("class_id"),
                   d.get("score"), dict(d.get("attributes") or {}),
                   None if mp is None else tuple(float(v) for v in mp))


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
    error: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    """Objects read but not kept, by reason: ``no_area`` (box empty after clipping),
    ``outside`` (point off the image), ``invalid`` (unusable coordinates), ``low_score``
    (below ``--min-score``), ``unverified`` (``--verify`` doubted them)."""
    answers: list[dict[str, Any]] = field(default_factory=list)
    """Questions asked about the whole set of detections and the model's answers:
    ``[{"question": ..., "answer": ...}]`` (grounding.pipeline.qa); in the record only when any."""
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
        return replace(
            self,
            boxes=[replace(b, attributes=dict(b.attributes)) for b in self.boxes],
            points=[replace(p, attributes=dict(p.attributes)) for p in self.points],
            dropped=dict(self.dropped),
            answers=[dict(a) for a in self.answers],
        )

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

    @property
    def xyxy(self) -> np.ndarray:
        return np.array([b.bbox for b in self.boxes], dtype=np.float64).reshape(-1, 4)

    def to_record(self) -> dict[str, Any]:
        """The JSON record every grounding command reads and writes."""
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "model": self.model,
            "dialect": self.dialect,
            "input_size": None if self.input_size is None else list(self.input_size),
            "detections": [b.to_dict() for b in self.boxes],
            "points": [p.to_dict() for p in self.points],
            "raw": self.raw,
            "truncated": self.truncated,
            "error": self.error,
            "dropped": dict(self.dropped),
        } | ({"answers": [dict(a) for a in self.answers]} if self.answers else {})

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_record(), ensure_ascii=False, **kwargs)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Result:
        size = record.get("input_size")
        return cls(
            boxes=[Box.from_dict(d) for d in record.get("detections") or []],
            points=[Point.from_dict(p) for p in record.get("points") or []],
            image=record.get("image"),
            width=record.get("width"),
            height=record.get("height"),
            model=record.get("model"),
            dialect=record.get("dialect"),
            input_size=None if size is None else (int(size[0]), int(size[1])),
            raw=record.get("raw") or "",
            truncated=bool(record.get("truncated")),
            error=record.get("error"),
            dropped=dict(record.get("dropped") or {}),
            answers=[dict(a) for a in record.get("answers") or []],
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
        """As ``supervision.Detections``; labels in ``data["class_name"]``.

        ``class_id`` is the matched class id, -1 for labels outside the class list; when
        no class list was used, ids number the distinct labels in order of appearance so
        annotators still colour each label apart.
        """
        import supervision as sv

        n = len(self.boxes)
        names = np.array([b.label or "" for b in self.boxes], dtype=object)
        if any(b.class_id is not None for b in self.boxes):
            ids = [-1 if b.class_id is None else b.class_id for b in self.boxes]
        else:
            order = {name: i for i, name in enumerate(dict.fromkeys(names.tolist()))}
            ids = [order[name] for name in names.tolist()]
        scores = [b.score for b in self.boxes]
        return sv.Detections(
            xyxy=self.xyxy.astype(np.float32),
            class_id=np.array(ids, dtype=int).reshape(n),
            confidence=None if n == 0 or any(s is None for s in scores)
            else np.array(scores, dtype=np.float32),
            data={"class_name": names},
        )
