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

import logging
import math
from collections.abc import Iterable, Iterator, Sequence

from grounding.backends.base import Backend, Generation, Request
from grounding.core.result import Result, score_at_least
from grounding.io.images import ImageSource
from grounding.pipeline.crops import DEFAULT_CONTEXT, DEFAULT_MIN_SIDE, crop_with_context, image_for
from grounding.pipeline.requests import run_requests

log = logging.getLogger("grounding")


YES_WORDS: tuple[str, ...] = ("yes",)
NO_WORDS: tuple[str, ...] = ("no",)
"""Answer words; a token matches when, stripped of spaces and case-folded, it is one of
them (so "Yes", " yes", "YES" and "yes" all count for yes)."""

_DETERMINERS = frozenset({"a", "an", "the", "this", "that", "these", "those", "some", "any",
                          "my", "your", "his", "her", "its", "our", "their"})


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
    out = [r.copy() for r in results]
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
    verified_box = score_at_least(threshold, lambda b: b.attributes.get("verify_score"))
    return [r.filter(keep_box=verified_box, reason="unverified") for r in out]


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
