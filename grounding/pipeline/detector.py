"""The Python entry point: hold a loaded model, detect on paths, PIL images or arrays."""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from grounding.backends.base import Backend, Generation, Request
from grounding.core.assemble import build_result
from grounding.core.classes import ClassMap
from grounding.core.confidence import score_objects
from grounding.core.errors import GroundingError
from grounding.core.result import Result
from grounding.io.images import ImageSource, describe, load_image
from grounding.pipeline.prefetch import prefetch
from grounding.pipeline.prompts import Task, class_prompt, expression_prompt, with_references
from grounding.pipeline.requests import run_requests


def _in_memory(source: object) -> bool:
    """Already decoded: loading it is too quick to be worth a worker thread."""
    return isinstance(source, Image.Image | np.ndarray)


def load_ontology(path: str | Path) -> dict[str, str]:
    """A JSON object mapping prompt phrases to class names, as autodistill's
    CaptionOntology does: ``{"person": "person", "pedestrian": "person", "car": "car"}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise GroundingError(f"cannot read ontology {path}: {exc}") from None
    if not isinstance(data, dict) or not data or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise GroundingError(f"ontology {path} must be a JSON object of phrase -> class name")
    return data


@dataclass(frozen=True)
class Query:
    """What to look for: classes (or an ontology) or a referring expression, boxes or points."""

    classes: ClassMap | None = None
    expression: str | None = None
    prompt: str | None = None
    task: Task = "boxes"
    system: str | None = None
    references: tuple[Image.Image, ...] = ()
    """Example images sent before each image (upright RGB): "find more like these"."""
    reference_names: tuple[str, ...] = ()

    @classmethod
    def make(cls, classes: Sequence[str] | Mapping[str, str] | str | None = None,
             prompt: str | None = None, *, points: bool = False,
             system: str | None = None, references: Sequence[ImageSource] = ()) -> Query:
        """A bad reference image raises ImageLoadError: it would spoil every request."""
        if classes is None and prompt is None:
            raise ValueError("give classes to find or a prompt")
        if isinstance(classes, str):
            class_map = ClassMap.parse(classes)
        elif classes is not None:
            class_map = classes if isinstance(classes, ClassMap) else ClassMap(classes)
        else:
            class_map = None
        loaded = tuple(load_image(r) for r in references)
        return cls(class_map, None, prompt, "points" if points else "boxes", system, loaded,
                   tuple(describe(r) for r in references))

    def text(self, dialect) -> str:
        """The prompt sent: the user's own, else the dialect's built-in one (which, with
        reference images, says which image to answer about)."""
        if self.prompt and self.classes is not None:
            return self.prompt
        if self.classes is not None:
            text = class_prompt(dialect, self.classes.prompt_phrases, self.task)
        else:
            assert self.prompt is not None
            text = expression_prompt(dialect, self.prompt, self.task)
        return with_references(text, len(self.references))

    def request(self, image: Image.Image, text: str) -> Request:
        return Request(image, text, self.system, self.task, references=self.references)


class Detector:
    """A loaded model that turns images into :class:`Result` objects.

    >>> det = Detector("Qwen/Qwen2.5-VL-7B-Instruct")          # doctest: +SKIP
    >>> det.detect("street.jpg", classes=["person", "car"])      # doctest: +SKIP
    """

    def __init__(self, backend: Backend | str | None = None, *, batch_size: int | None = None,
                 io_workers: int = 4, min_score: float | None = None,
                 verify: bool = False, verify_threshold: float = 0.5,
                 **backend_options) -> None:
        if backend is None or isinstance(backend, str):
            from grounding.backends.local import LocalBackend
            from grounding.backends.options import DEFAULT_MODEL

            backend = LocalBackend(backend or DEFAULT_MODEL, **backend_options)
        self.backend = backend
        self.batch_size = max(1, batch_size or getattr(backend, "preferred_batch", 4))
        self.io_workers = io_workers
        self.min_score = min_score
        """Drop boxes and points scored below this (grounding.core.confidence); None keeps all."""
        self.verify = verify
        """Ask the model about every box whether it shows its label (grounding.pipeline.verify)."""
        self.verify_threshold = verify_threshold
        """With ``verify``: drop boxes whose probability of "yes" is below this."""

    def detect(self, image: ImageSource, classes=None, prompt: str | None = None, *,
               points: bool = False, system: str | None = None, verify: bool | None = None,
               verify_threshold: float | None = None,
               references: Sequence[ImageSource] = ()) -> Result:
        """Detect in one image; a bad image raises :class:`ImageLoadError`."""
        result = next(self.detect_many([image], classes, prompt, points=points, system=system,
                                       verify=verify, verify_threshold=verify_threshold,
                                       references=references))
        if result.error:
            raise GroundingError(result.error)
        return result

    def detect_many(self, images: Iterable[ImageSource], classes=None,
                    prompt: str | None = None, *, points: bool = False,
                    system: str | None = None, batch_size: int | None = None,
                    window: int = 8, verify: bool | None = None,
                    verify_threshold: float | None = None,
                    references: Sequence[ImageSource] = ()) -> Iterator[Result]:
        """Results in input order; a bad image yields a Result with ``error`` set.

        Images are decoded in ``io_workers`` threads while the model works, read up to
        ``window`` batches ahead and grouped by model-frame size inside that window, so a
        batch pads little; memory stays bounded by the window.

        ``verify`` (default: the detector's) asks the model about every box whether it
        shows its label and drops boxes whose probability of "yes" is under
        ``verify_threshold`` (grounding.pipeline.verify); the boxes of ``batch_size`` images are
        verified together.

        ``references``: example images shown before every image in the same message
        ("find more like these"); the built-in prompt then says to answer about the last
        image, and the coordinates are read in that image's frame. A reference that cannot
        be read raises ImageLoadError before any request is sent.
        """
        query = Query.make(classes, prompt, points=points, system=system,
                           references=references)
        yield from self.detect_query(images, query, batch_size=batch_size, window=window,
                                     verify=verify, verify_threshold=verify_threshold)

    def detect_query(self, images: Iterable[ImageSource], query: Query, *,
                     batch_size: int | None = None, window: int = 8,
                     verify: bool | None = None,
                     verify_threshold: float | None = None) -> Iterator[Result]:
        """detect_many for a Query already made (the CLI and grounding.runs.labeling make one
        to check it, and to record it, before the first image)."""
        size = batch_size or self.batch_size
        if not (self.verify if verify is None else verify):
            yield from self._detect_many(images, query, size, window)
            return
        from grounding.pipeline.verify import verified

        threshold = self.verify_threshold if verify_threshold is None else verify_threshold
        if not hasattr(self.backend, "stream"):
            yield from verified(self._detect_many(images, query, size, window), self.backend,
                                threshold=threshold, chunk=size, batch_size=size)
            return
        # A server: detect a chunk of images to the end, then verify its boxes, so the two
        # streams never overlap and at most ``concurrency`` requests are in flight.
        source = iter(images)
        while chunk := list(itertools.islice(source, size)):
            yield from verified(self._detect_many(chunk, query, size, window), self.backend,
                                threshold=threshold, chunk=size, batch_size=size)

    def _detect_many(self, images: Iterable[ImageSource], query: Query, size: int,
                     window: int) -> Iterator[Result]:
        text = query.text(self.backend.dialect)
        if hasattr(self.backend, "stream"):
            yield from self._stream(images, query, text, size * window)
            return
        pending: list[tuple[int, str, Image.Image | None, str | None]] = []
        loaded = self._loaded(images, size * window)
        for index, item in enumerate(loaded):
            pending.append((index, *item))
            if len(pending) >= size * window:
                yield from self._run(pending, query, text, size)
                pending = []
        if pending:
            yield from self._run(pending, query, text, size)

    def _stream(self, images: Iterable[ImageSource], query: Query, text: str,
                ahead: int) -> Iterator[Result]:
        """For backends that keep requests in flight across the whole stream (servers):
        no batches, no barriers; results still come out in input order."""
        entries: deque[tuple[str, Image.Image | None, str | None]] = deque()

        def requests() -> Iterator[Request]:
            for name, image, error in self._loaded(images, ahead):
                entries.append((name, image, error))
                if image is not None:
                    yield query.request(image, text)

        for out in self.backend.stream(requests()):
            while entries[0][1] is None:
                name, _, error = entries.popleft()
                yield self._failed(name, error)
            name, image, _ = entries.popleft()
            yield self._result(name, image, out, query, text)
        while entries:
            name, _, error = entries.popleft()
            yield self._failed(name, error)

    def _loaded(self, images: Iterable[ImageSource], ahead: int):
        """(name, image, error) per input, in order, files decoded in worker threads."""
        return prefetch(images, self._load, workers=self.io_workers, ahead=ahead,
                        inline=_in_memory)

    @staticmethod
    def _load(source: ImageSource) -> tuple[str, Image.Image | None, str | None]:
        name = describe(source)
        try:
            return name, load_image(source), None
        except GroundingError as exc:
            return name, None, str(exc)

    def _run(self, items, query: Query, text: str, size: int) -> Iterator[Result]:
        results: dict[int, Result] = {}
        good = []
        for index, name, image, error in items:
            if image is None:
                results[index] = self._failed(name, str(error))
            else:
                good.append((index, name, image))
        outputs = run_requests(self.backend, [query.request(image, text)
                                              for _, _, image in good], size)
        for (index, name, image), out in zip(good, outputs, strict=True):
            results[index] = self._result(name, image, out, query, text)
        for index, *_ in items:
            yield results[index]

    def _failed(self, name: str, error: str) -> Result:
        """The record of an image that could not be read."""
        return Result(image=name, model=self.backend.model, dialect=self.backend.dialect.name,
                      error=error)

    def _result(self, name: str, image: Image.Image, out: Generation | Exception,
                query: Query, prompt: str) -> Result:
        if isinstance(out, Exception):
            return Result(image=name, width=image.width, height=image.height,
                          model=self.backend.model, dialect=self.backend.dialect.name,
                          error=f"{name}: {type(out).__name__}: {out}")
        parsed = self.backend.dialect.parse(out.text)
        scores = score_objects(out.text, parsed.objects, out.tokens, out.token_logprobs)
        result = build_result(
            parsed, self.backend.dialect, image_size=image.size, input_size=out.input_size,
            classes=query.classes, raw=out.text, model=self.backend.model, image=name,
            truncated=out.truncated, scores=scores, min_score=self.min_score,
        )
        result.prompt = prompt
        result.generation = out
        result.attach(image)
        return result
