"""Verification: ask the model about every box whether it shows its label.

Each box is cut out of the upright image with some context around it
(:func:`crop_with_context`) and sent to the same backend with the question
"Is this a {label}? Answer yes or no." and a limit of one new token. The first token's
top log-probabilities give

    verify_score = P(yes) / (P(yes) + P(no))

where P(yes) sums the probabilities of the yes-like tokens among them ("Yes", " yes",
"YES", ...) and P(no) those of the no-like ones. A box scored below the threshold is
dropped (counted in ``result.dropped["unverified"]``); the score stays on every kept box
as ``attributes["verify_score"]``. A box whose score cannot be read (neither "yes" nor
"no" among the top tokens, or its request failed) is kept with ``verify_score`` None, as
unscored boxes are kept by ``--min-score``. Like the detection score it is not calibrated.

All boxes of all images handed over at once go to the backend as one stream (a server
keeps ``concurrency`` of them in flight) or in batches of ``batch_size`` (local models).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Sequence

from PIL import Image

from grounding.backends.base import Backend, Generation, Request
from grounding.core.result import Box, Result
from grounding.io.images import ImageSource, load_image, upright

log = logging.getLogger("grounding")


YES_WORDS: tuple[str, ...] = ("yes",)
NO_WORDS: tuple[str, ...] = ("no",)
"""Answer words; a token matches when, stripped of spaces and case-folded, it is one of
them (so "Yes", " yes", "YES" and "yes" all count for yes)."""

DEFAULT_CONTEXT = 0.25
DEFAULT_MIN_SIDE = 28
"""One Qwen2/2.5-VL merge unit: a smaller crop is upscaled by the model frame anyway."""

_DETERMINERS = frozenset({"a", "an", "the", "this", "that", "these", "those", "some", "any",
                          "my", "your", "his", "her", "its", "our", "their"})


# ----------------------------------------------------------------------------- geometry


def _span(lo: float, hi: float, context: float, min_side: int, limit: int) -> tuple[int, int]:
    """One axis: grow by ``context`` of the length on each side, clip to [0, limit], cover
    whole pixels, then widen to ``min_side`` around the middle, shifted inside the image."""
    lo, hi = min(lo, hi), max(lo, hi)
    grow = context * (hi - lo)
    a = max(0, math.floor(lo - grow + 1e-9))
    b = min(limit, math.ceil(hi + grow - 1e-9))
    if b <= a:  # a degenerate box: at least the pixel it touches
        a = min(max(0, math.floor(lo)), limit - 1)
        b = a + 1
    want = min(min_side, limit)
    if b - a < want:
        middle = (a + b) / 2
        a = math.floor(middle - want / 2)
        a = min(max(0, a), limit - want)
        b = a + want
    return a, b


CropBox = tuple[int, int, int, int]


def crop_with_context(image: Image.Image, box: Box | Sequence[float],
                      context: float = DEFAULT_CONTEXT,
                      min_side: int = DEFAULT_MIN_SIDE) -> tuple[Image.Image, CropBox]:
    """The part of ``image`` around ``box`` and where it is: ``(crop, (x0, y0, x1, y1))``.

    ``box`` is ``[x_min, y_min, x_max, y_max]`` in pixel-edge coordinates of the image as
    displayed (a :class:`Box` or four numbers). It is grown by ``context`` times its width
    (height) on the left and right (top and bottom), clipped to the image and widened to
    whole pixels; a side shorter than ``min_side`` pixels is widened to it around the
    box's middle (never beyond the image). The EXIF orientation of ``image`` is applied
    first, so a photo opened with PIL directly is cut where the box is on screen.
    """
    if context < 0 or min_side < 1:
        raise ValueError("context must be >= 0 and min_side >= 1")
    bbox = box.bbox if isinstance(box, Box) else tuple(float(v) for v in box)
    if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"expected a box [x_min, y_min, x_max, y_max], got {bbox!r}")
    image = upright(image)
    w, h = image.size
    x0, x1 = _span(bbox[0], bbox[2], context, min_side, w)
    y0, y1 = _span(bbox[1], bbox[3], context, min_side, h)
    return image.crop((x0, y0, x1, y1)), (x0, y0, x1, y1)


# -------------------------------------------------------------------- yes / no reading


def verify_prompt(label: str | None) -> str:
    """The question asked about one box: ``Is this a {label}? Answer yes or no.`` (every
    dialect reads plain text; "an" before a vowel, no article before one already there)."""
    name = " ".join((label or "").split()) or "object"
    if name.split()[0].lower() in _DETERMINERS:
        phrase = name
    else:
        phrase = ("an " if name[0].lower() in "aeiou" else "a ") + name
    return f"Is this {phrase}? Answer yes or no."


def _matches(token: str, words: frozenset[str]) -> bool:
    return token.strip().casefold() in words


def yes_probability(generation: Generation, yes: Iterable[str] = YES_WORDS,
                    no: Iterable[str] = NO_WORDS) -> float | None:
    """P(yes) / (P(yes) + P(no)) read from the FIRST generated token's top log-probabilities.

    P(yes) is the sum of the probabilities of the yes-like tokens among the top ones
    (``yes`` words, any case, leading/trailing spaces ignored), P(no) likewise; the token
    actually generated counts too (a server may send it without alternatives). None when
    neither appears there (or the generation carries no log-probabilities)."""
    candidates = dict(generation.top_logprobs[0]) if generation.top_logprobs else {}
    if generation.tokens and generation.token_logprobs:
        candidates.setdefault(generation.tokens[0], generation.token_logprobs[0])
    yes_set = frozenset(w.strip().casefold() for w in yes)
    no_set = frozenset(w.strip().casefold() for w in no)
    p_yes = p_no = 0.0
    found = False
    for token, logprob in candidates.items():
        if _matches(token, yes_set):
            p_yes += math.exp(logprob)
            found = True
        elif _matches(token, no_set):
            p_no += math.exp(logprob)
            found = True
    if not found or p_yes + p_no <= 0.0:
        return None
    return p_yes / (p_yes + p_no)


def verification_score(generation: Generation, yes: Iterable[str] = YES_WORDS,
                       no: Iterable[str] = NO_WORDS) -> float | None:
    """:func:`yes_probability`; for a backend that returns no log-probabilities at all (a
    server without logprobs support) the answer text decides: 1.0 for yes, 0.0 for no."""
    if generation.top_logprobs or generation.tokens:
        return yes_probability(generation, yes, no)
    words = generation.text.strip().split()
    first = words[0].strip(".,!:;\"'").casefold() if words else ""
    if first in {w.strip().casefold() for w in yes}:
        return 1.0
    if first in {w.strip().casefold() for w in no}:
        return 0.0
    return None


# ------------------------------------------------------------------------- backend runs


def run_requests(backend: Backend, requests: list[Request],
                 batch_size: int | None = None) -> list[Generation | Exception]:
    """One output per request, in order. A backend that streams (a server) gets them all as
    one stream; otherwise they go to ``generate`` in batches of ``batch_size``, grouped by
    model-frame size so a batch pads little."""
    if not requests:
        return []
    stream = getattr(backend, "stream", None)
    if stream is not None:
        return list(stream(iter(requests)))
    size = max(1, batch_size or getattr(backend, "preferred_batch", 8))
    order = sorted(range(len(requests)), key=lambda i: backend.frame(requests[i].image.size))
    out: list[Generation | Exception | None] = [None] * len(requests)
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        for i, generation in zip(chunk, backend.generate([requests[i] for i in chunk]),
                                 strict=True):
            out[i] = generation
    return out  # type: ignore[return-value]


def image_for(result: Result, image: ImageSource | None) -> Image.Image:
    """The upright RGB image of ``result``: ``image`` if given, else the one attached to
    the result, else its ``image`` path; its size must be the result's."""
    if image is None:
        image = result._image
    if image is None:
        if not result.image:
            raise ValueError("no image: pass the image the result was made from")
        image = result.image
    picture = load_image(image)
    if result.image_size is not None and picture.size != result.image_size:
        raise ValueError(f"image is {picture.width}x{picture.height} but the result is for "
                         f"{result.width}x{result.height}")
    return picture


def copy_result(result: Result) -> Result:
    """A copy whose box lists, attribute dicts and counters can change freely."""
    return dataclasses.replace(
        result,
        boxes=[dataclasses.replace(b, attributes=dict(b.attributes)) for b in result.boxes],
        points=[dataclasses.replace(p, attributes=dict(p.attributes)) for p in result.points],
        dropped=dict(result.dropped),
        answers=[dict(a) for a in result.answers],
    )


# ------------------------------------------------------------------------------- verify


def verify_many(results: Sequence[Result], images: Sequence[ImageSource | None] | None,
                backend: Backend, *, threshold: float = 0.5, batch_size: int | None = None,
                context: float = DEFAULT_CONTEXT, min_side: int = DEFAULT_MIN_SIDE,
                yes: Iterable[str] = YES_WORDS, no: Iterable[str] = NO_WORDS,
                system: str | None = None) -> list[Result]:
    """Verify every box of every result in one go; returns new results (the given ones
    are left as they are). ``images[i]`` is result i's image (None: the attached one or
    its path). Results with an error or without boxes come back unchanged."""
    yes, no = tuple(yes), tuple(no)
    if images is None:
        images = [None] * len(results)
    if len(images) != len(results):
        raise ValueError("give one image per result")
    out = [copy_result(r) for r in results]
    owners: list[tuple[int, int]] = []
    requests: list[Request] = []
    for i, (result, image) in enumerate(zip(out, images, strict=True)):
        if result.error or not result.boxes:
            continue
        picture = image_for(result, image)
        for j, box in enumerate(result.boxes):
            crop, _ = crop_with_context(picture, box, context, min_side)
            requests.append(Request(crop, verify_prompt(box.label), system, task="text",
                                    max_new_tokens=1))
            owners.append((i, j))
    generations = run_requests(backend, requests, batch_size)
    failures = 0
    for (i, j), generation in zip(owners, generations, strict=True):
        box = out[i].boxes[j]
        if isinstance(generation, Exception):
            box.attributes["verify_score"] = None
            box.attributes["verify_error"] = f"{type(generation).__name__}: {generation}"
            failures += 1
        else:
            box.attributes["verify_score"] = verification_score(generation, yes, no)
    if failures:
        log.warning("grounding: %d of %d verification requests failed; those boxes are kept "
                    "unverified", failures, len(requests))
    for result in out:
        kept = [b for b in result.boxes
                if b.attributes.get("verify_score") is None
                or b.attributes["verify_score"] >= threshold]
        dropped = len(result.boxes) - len(kept)
        if dropped:
            result.boxes = kept
            result.dropped["unverified"] = result.dropped.get("unverified", 0) + dropped
    return out


def verify(result: Result, image: ImageSource | None, backend: Backend, *,
           threshold: float = 0.5, batch_size: int | None = None, **options) -> Result:
    """Verify the boxes of one result (see :func:`verify_many` for the options)."""
    return verify_many([result], [image], backend, threshold=threshold,
                       batch_size=batch_size, **options)[0]


def verified(results: Iterable[Result], backend: Backend, *, threshold: float = 0.5,
             chunk: int = 8, batch_size: int | None = None, **options) -> Iterator[Result]:
    """Verify a stream of results (with their images attached, as the Detector makes them)
    ``chunk`` results at a time, all boxes of a chunk together; same order."""
    pending: list[Result] = []
    for result in results:
        pending.append(result)
        if len(pending) >= chunk:
            yield from verify_many(pending, None, backend, threshold=threshold,
                                   batch_size=batch_size, **options)
            pending = []
    if pending:
        yield from verify_many(pending, None, backend, threshold=threshold,
                               batch_size=batch_size, **options)
