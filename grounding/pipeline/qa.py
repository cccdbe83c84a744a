"""Visual questions about detections: about each box, or about the whole numbered set.

``about="each"``: every box is cut out with context (grounding.pipeline.verify.crop_with_context)
and the question is asked about the crop, all boxes in one stream or batched. An answer
holding a JSON object (``{"color": "red"}``, fenced or inside prose) has its keys merged
into the box's ``attributes``; any other answer is stored as ``attributes["answer"]``.
``{label}`` in the question is replaced by the box's label.

``about="all"``: the boxes are drawn on the image numbered 1..N and the question is asked
once, prefixed with "The boxes are numbered 1 to N."; the answer is appended to
``result.answers`` as ``{"question", "answer"}``.

Points are not asked about (they have no region to show).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from grounding.backends.base import Backend, Generation, Request
from grounding.core.errors import GroundingError
from grounding.core.result import Result, register_view
from grounding.io.images import ImageSource
from grounding.io.records import pick_record
from grounding.parsing.json_objects import load_lenient, outside_strings
from grounding.pipeline.crops import DEFAULT_CONTEXT, DEFAULT_MIN_SIDE, crop_with_context, image_for
from grounding.pipeline.requests import run_requests

log = logging.getLogger("grounding")

About = Literal["each", "all"]


def first_object(text: str) -> dict[str, Any] | None:
    """The first ``{...}`` in ``text`` that parses (JSON, or lenient Python-literal syntax)
    as an object; None when there is none."""
    start = text.find("{")
    while start >= 0:
        depth = 0
        for end, c in outside_strings(text, start):
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    value = load_lenient(text[start : end + 1])
                    if isinstance(value, dict):
                        return value
                    break
        start = text.find("{", start + 1)
    return None


def answer_attributes(text: str) -> dict[str, Any]:
    """What an answer adds to a box's attributes: the keys of the JSON object in it, else
    ``{"answer": text}`` (stripped)."""
    found = first_object(text)
    if found:
        return {str(k): v for k, v in found.items()}
    return {"answer": text.strip()}


def numbered(image: Image.Image, result: Result) -> Image.Image:
    """A copy of ``image`` with the result's boxes drawn and labelled 1..N, each number in
    its box's colour at the box's top-left corner."""
    import supervision as sv

    scene = np.array(image.convert("RGB"))
    n = len(result.boxes)
    if not n:
        return Image.fromarray(scene)
    detections = sv.Detections(xyxy=result.xyxy.astype(np.float32),
                               class_id=np.arange(n, dtype=int))
    thickness = max(2, round(min(image.size) / 300))
    text_scale = max(0.5, min(image.size) / 800)
    scene = sv.BoxAnnotator(thickness=thickness, color_lookup=sv.ColorLookup.INDEX).annotate(
        scene, detections)
    scene = sv.LabelAnnotator(text_scale=text_scale, text_thickness=thickness,
                              text_position=sv.Position.TOP_LEFT,
                              color_lookup=sv.ColorLookup.INDEX).annotate(
        scene, detections, labels=[str(i + 1) for i in range(n)])
    return Image.fromarray(scene)


def all_prompt(question: str, n: int) -> str:
    """The question about the whole set, as asked with the numbered image."""
    if n == 0:
        return question
    if n == 1:
        return f"The box is numbered 1. {question}"
    return f"The boxes are numbered 1 to {n}. {question}"


def _failure(out: Generation | Exception) -> str | None:
    return f"{type(out).__name__}: {out}" if isinstance(out, Exception) else None


@register_view("ask")
def ask(result: Result, image: ImageSource | None, backend: Backend, question: str, *,
        about: About = "each", batch_size: int | None = None, system: str | None = None,
        max_new_tokens: int | None = None, context: float = DEFAULT_CONTEXT,
        min_side: int = DEFAULT_MIN_SIDE) -> Result:
    """Ask ``question`` about each detection of ``result`` or about all of them at once;
    returns an updated copy (the given result is left as it is).

    ``image`` is the result's image (None: the attached one, else its ``image`` path).
    A failed request is stored as ``attributes["ask_error"]`` (each) or as the answer's
    ``error`` (all), never raised.
    """
    return ask_with_answers(result, image, backend, question, about=about,
                            batch_size=batch_size, system=system,
                            max_new_tokens=max_new_tokens, context=context,
                            min_side=min_side)[0]


def ask_with_answers(result: Result, image: ImageSource | None, backend: Backend,
                     question: str, *, about: About = "each", batch_size: int | None = None,
                     system: str | None = None, max_new_tokens: int | None = None,
                     context: float = DEFAULT_CONTEXT, min_side: int = DEFAULT_MIN_SIDE
                     ) -> tuple[Result, list[str | None]]:
    """:func:`ask`, and the answers' texts as the model wrote them (stripped): one per
    box for ``each``, one for ``all``; None where the request failed."""
    if about not in ("each", "all"):
        raise ValueError(f"about must be 'each' or 'all', not {about!r}")
    if not question.strip():
        raise ValueError("empty question")
    if result.error:
        raise ValueError(f"the result is an error record: {result.error}")
    picture = image_for(result, image)
    out = result.copy()
    if about == "all":
        request = Request(numbered(picture, out), all_prompt(question, len(out.boxes)), system,
                          task="text", max_new_tokens=max_new_tokens)
        [generation] = run_requests(backend, [request], batch_size)
        entry: dict[str, Any] = {"question": question}
        error = _failure(generation)
        if error:
            entry["answer"] = None
            entry["error"] = error
        else:
            entry["answer"] = generation.text.strip()
        out.answers.append(entry)
        return out, [entry["answer"]]
    requests = []
    for box in out.boxes:
        crop, _ = crop_with_context(picture, box, context, min_side)
        prompt = question.replace("{label}", box.label or "object")
        requests.append(Request(crop, prompt, system, task="text", max_new_tokens=max_new_tokens))
    texts: list[str | None] = []
    for box, generation in zip(out.boxes, run_requests(backend, requests, batch_size),
                               strict=True):
        error = _failure(generation)
        if error:
            box.attributes["ask_error"] = error
            texts.append(None)
        else:
            box.attributes.update(answer_attributes(generation.text))
            texts.append(generation.text.strip())
    failures = texts.count(None)
    if failures:
        log.warning("grounding: %d of %d questions failed", failures, len(requests))
    return out, texts


# ------------------------------------------------------------------------ record files


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def names_image(named: str, image: str | Path) -> bool:
    """Whether a record's ``image`` names the file ``image``: the same path as written or
    resolved, or a relative path that ``image``'s resolved path ends with (a label run
    stores paths relative to its images folder; ``grounding detect`` the path it was given,
    maybe relative to another working directory)."""
    if named == str(image):
        return True
    target = _resolved(Path(image))
    path = Path(named)
    if _resolved(path) == target:
        return True
    return (not path.is_absolute() and ".." not in path.parts
            and target.parts[-len(path.parts):] == path.parts)


def _not_a_record(record: dict[str, Any], source: str | Path) -> GroundingError:
    keys = ", ".join(map(str, list(record)[:5])) or "none"
    return GroundingError(
        f"{source} is not a grounding record: it has no \"detections\" list (keys: {keys}); "
        "pass the JSON that grounding detect or grounding label wrote")


def result_for_image(records: list[dict[str, Any]], image: str | Path,
                     source: str | Path) -> Result:
    """The :class:`Result` to ask about the file ``image`` from the records of the file
    ``source`` (:func:`grounding.io.records.read_records`): the grounding record of that
    image (:func:`grounding.io.records.pick_record`), checked by :func:`record_result`."""
    found = [r for r in records if isinstance(r.get("detections"), list)]
    if not found:
        raise _not_a_record(records[0] if records else {}, source)
    return record_result(pick_record(found, image, str(source)), image, source)


def record_result(record: dict[str, Any], image: str | Path, source: str | Path) -> Result:
    """The :class:`Result` of ``record`` (read from the file ``source``) to ask about the
    file ``image``; :class:`GroundingError` naming ``source`` when it is no grounding record
    (no ``detections`` list: ``{"foo": 1}`` is not an empty record), when the record names
    another image file (a record of another image of the same size would put its boxes on
    this one), when it is an error record, or when it has no image size (coordinates still
    in the model's frame). A record whose ``image`` is not a file name (an image given to
    the Python API as pixels, ``<PIL image ...>``) is taken for ``image``."""
    if not isinstance(record.get("detections"), list):
        raise _not_a_record(record, source)
    named = record.get("image")
    if (isinstance(named, str) and named and not named.startswith("<")
            and not names_image(named, image)):
        raise GroundingError(f"{source} holds the detections of {named}, not of {image}; "
                             "pass the record of the image you ask about")
    try:
        result = Result.from_record(record)
    except GroundingError as exc:
        raise GroundingError(f"{source}: {exc}") from None
    if result.error:
        raise GroundingError(f"{source}: the record of {image} is an error: {result.error}")
    if result.image_size is None:
        raise GroundingError(f"{source}: the record has no image size, so its coordinates "
                             "are in the model's frame (grounding parse without "
                             "--image-size); detect on the image to get a record to ask about")
    return result
