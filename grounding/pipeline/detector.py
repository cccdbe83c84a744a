"""The Python entry point: hold a loaded model, detect on paths, PIL images or arrays."""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from grounding.backends.base import Backend, Generation
from grounding.core.dedup import DEFAULT_DEDUP_IOU
from grounding.core.errors import GroundingError
from grounding.core.result import Result
from grounding.core.tiles import Tiling
from grounding.io.images import ImageSource, Named, describe, load_image
from grounding.parsing import Keys
from grounding.pipeline.masks import Segmenter
from grounding.pipeline.parts import Keep, Part, assemble, failed, plan, requests
from grounding.pipeline.prefetch import prefetch
from grounding.pipeline.query import Query
from grounding.pipeline.requests import run_requests

__all__ = ["Detector", "Query", "load_ontology"]


def _in_memory(source: object) -> bool:
    """Already decoded: loading it is too quick to be worth a worker thread."""
    return isinstance(source.source if isinstance(source, Named) else source,
                      Image.Image | np.ndarray)


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


class Detector:
    """A loaded model that turns images into :class:`Result` objects.

    >>> det = Detector("Qwen/Qwen2.5-VL-7B-Instruct")          # doctest: +SKIP
    >>> det.detect("street.jpg", classes=["person", "car"])      # doctest: +SKIP
    """

    def __init__(self, backend: Backend | str | None = None, *, batch_size: int | None = None,
                 io_workers: int = 4, min_score: float | None = None,
                 verify: bool = False, verify_threshold: float = 0.5,
                 dedup_iou: float | None = DEFAULT_DEDUP_IOU, dedup_agnostic: bool = False,
                 masks: Segmenter | bool | str | None = None,
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
        self.dedup_iou = dedup_iou
        """Same-class boxes overlapping above this IoU are one object written twice
        (grounding.core.dedup); 1.0 removes only identical boxes, None keeps every one."""
        self.dedup_agnostic = dedup_agnostic
        """Compare boxes across classes too when removing duplicates."""
        if masks is True or isinstance(masks, str):
            from grounding.backends.segment import DEFAULT_MASK_MODEL, SamSegmenter

            masks = SamSegmenter(DEFAULT_MASK_MODEL if masks is True else masks,
                                 device=getattr(backend, "device", None))
        self.masks: Segmenter | None = masks or None
        """Segment every kept box (True: the default SAM 2 checkpoint; a name: that
        checkpoint; a segmenter); None: boxes only."""

    @property
    def keep(self) -> Keep:
        """Which boxes this detector keeps."""
        return Keep(self.min_score, self.dedup_iou, self.dedup_agnostic)

    def detect(self, image: ImageSource, classes=None, prompt: str | None = None, *,
               points: bool = False, system: str | None = None, verify: bool | None = None,
               verify_threshold: float | None = None,
               references: Sequence[ImageSource] = (), per_class: bool | None = None,
               tiles: str | Tiling | None = None, keys: Keys | None = None) -> Result:
        """Detect in one image; a bad image raises :class:`ImageLoadError`."""
        result = next(self.detect_many([image], classes, prompt, points=points, system=system,
                                       verify=verify, verify_threshold=verify_threshold,
                                       references=references, per_class=per_class,
                                       tiles=tiles, keys=keys))
        if result.error:
            raise GroundingError(result.error)
        return result

    def detect_many(self, images: Iterable[ImageSource], classes=None,
                    prompt: str | None = None, *, points: bool = False,
                    system: str | None = None, batch_size: int | None = None,
                    window: int = 8, verify: bool | None = None,
                    verify_threshold: float | None = None,
                    references: Sequence[ImageSource] = (), per_class: bool | None = None,
                    tiles: str | Tiling | None = None,
                    keys: Keys | None = None) -> Iterator[Result]:
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

        ``per_class``: ask for each class in its own request (None: when the dialect's
        model grounds one reference at a time). ``tiles``: ``"auto"``, ``"3x2"`` or a
        :class:`~grounding.core.tiles.Tiling`: ask about overlapping tiles of each image
        (small objects in large images); boxes come back in whole-image pixels.
        ``keys``: with a prompt of one's own that names its keys, where the answers hold
        boxes, points and labels (grounding.parsing.Keys).
        """
        tiling = Tiling.parse(tiles) if isinstance(tiles, str) else tiles
        query = Query.make(classes, prompt, points=points, system=system,
                           references=references, per_class=per_class, tiling=tiling,
                           keys=keys)
        yield from self.detect_query(images, query, batch_size=batch_size, window=window,
                                     verify=verify, verify_threshold=verify_threshold)

    def detect_query(self, images: Iterable[ImageSource], query: Query, *,
                     batch_size: int | None = None, window: int = 8,
                     verify: bool | None = None,
                     verify_threshold: float | None = None) -> Iterator[Result]:
        """detect_many for a Query already made (the CLI and grounding.runs.labeling make one
        to check it, and to record it, before the first image). With ``masks`` set,
        every box kept (after verification) is segmented (grounding.pipeline.masks)."""
        size = batch_size or self.batch_size
        found = self._verified(images, query, size, window, verify, verify_threshold)
        if self.masks is None:
            yield from found
            return
        from grounding.pipeline.masks import with_masks

        yield from with_masks(found, self.masks, batch_size=size)

    def _verified(self, images: Iterable[ImageSource], query: Query, size: int, window: int,
                  verify: bool | None, verify_threshold: float | None) -> Iterator[Result]:
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
        if hasattr(self.backend, "stream"):
            yield from self._stream(images, query, size * window)
            return
        pending: list[tuple[int, str, Image.Image | None, str | None]] = []
        loaded = self._loaded(images, size * window)
        for index, item in enumerate(loaded):
            pending.append((index, *item))
            if len(pending) >= size * window:
                yield from self._run(pending, query, size)
                pending = []
        if pending:
            yield from self._run(pending, query, size)

    def _stream(self, images: Iterable[ImageSource], query: Query,
                ahead: int) -> Iterator[Result]:
        """For backends that keep requests in flight across the whole stream (servers):
        no batches, no barriers; results still come out in input order."""
        entries: deque[tuple[str, Image.Image | None, str | None, list[Part]]] = deque()

        def sent() -> Iterator:
            for name, image, error in self._loaded(images, ahead):
                parts = [] if image is None else plan(query, self.backend, image.size)
                entries.append((name, image, error, parts))
                if image is not None:
                    yield from requests(query, image, parts)

        outputs: list[Generation | Exception] = []
        for out in self.backend.stream(sent()):
            outputs.append(out)
            while entries and (entries[0][1] is None or len(outputs) >= len(entries[0][3])):
                name, image, error, parts = entries.popleft()
                if image is None:
                    yield failed(name, None, self.backend, str(error))
                    continue
                done, outputs = outputs[:len(parts)], outputs[len(parts):]
                yield assemble(name, image, query, parts, done, self.backend, self.keep)
        while entries:
            name, _, error, _ = entries.popleft()
            yield failed(name, None, self.backend, str(error))

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

    def _run(self, items, query: Query, size: int) -> Iterator[Result]:
        results: dict[int, Result] = {}
        good = []
        sent = []
        for index, name, image, error in items:
            if image is None:
                results[index] = failed(name, None, self.backend, str(error))
            else:
                parts = plan(query, self.backend, image.size)
                good.append((index, name, image, parts))
                sent += requests(query, image, parts)
        outputs = run_requests(self.backend, sent, size)
        start = 0
        for index, name, image, parts in good:
            done = outputs[start:start + len(parts)]
            start += len(parts)
            results[index] = assemble(name, image, query, parts, done, self.backend, self.keep)
        for index, *_ in items:
            yield results[index]
