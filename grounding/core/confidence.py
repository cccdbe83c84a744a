"""Scores for boxes and points from the log-probabilities of the tokens the model wrote.

VLM grounding gives boxes without scores. grounding scores each object by the rule

    score = exp(mean log p(token))   over the generated tokens that overlap the
                                     characters of the object's coordinates and label

i.e. the geometric mean of the probabilities the model gave to the digits of its box and
to the words of its label. A box the model wrote hesitantly (low-probability digits, an
unlikely label) scores low. The score is **not calibrated**: it is not the probability
that the box is right, and its scale differs between models, prompts and decoding
settings. Use it to rank and threshold (``--min-score``) after checking a threshold on
your own data with ``grounding eval``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from grounding.parsing import RawObject

Span = tuple[int, int]


def token_spans(text: str, tokens: Sequence[str]) -> list[Span] | None:
    """Character span of each generated token in ``text``.

    Tokens decoded one by one normally concatenate to the text; where they do not (a
    character split across byte-level tokens, special tokens the text omits) each token
    is looked for from where the previous one ended, and a token not found gets an empty
    span there. None when the tokens describe another text altogether."""
    if "".join(tokens) == text:
        spans, at = [], 0
        for token in tokens:
            spans.append((at, at + len(token)))
            at += len(token)
        return spans
    spans, at, found = [], 0, 0
    for token in tokens:
        where = text.find(token, at, at + len(token) + 16) if token else -1
        if where < 0:
            spans.append((at, at))
            continue
        spans.append((where, where + len(token)))
        at = where + len(token)
        found += len(token)
    return spans if found >= 0.5 * len(text) else None


def _number(value: float) -> str:
    """A regex for a number as a model writes it: 12, 012, 12.0, 12.50, "12"."""
    if float(value).is_integer():
        return rf"(?<![\d.])-?0*{abs(int(value))}(?:\.0*)?(?![\d.])"
    text = repr(abs(float(value))).rstrip("0")
    whole, _, frac = text.partition(".")
    return rf"(?<![\d.])-?0*{whole}\.{frac}0*(?![\d.])"


def locate(text: str, objects: Sequence[RawObject]) -> list[list[Span]]:
    """For each object, the character spans of its coordinates and of its label.

    Objects come in text order, so each one's coordinates are searched from where the
    previous one's ended. Labels come second: each object takes the occurrence of its
    label nearest to its coordinates, between its neighbours' coordinates, that no earlier
    object took (before the coordinates in reference dialects and label-first JSON, after
    them in Qwen's JSON), so twelve "small cake" labels go to twelve boxes."""
    coords: list[Span | None] = []
    cursor = 0
    for obj in objects:
        pattern = r"[^\d]{1,24}?".join(_number(v) for v in obj.coords)
        m = re.compile(pattern).search(text, cursor)
        coords.append(m.span() if m else None)
        if m:
            cursor = m.end()
    found: list[list[Span]] = []
    claimed: set[Span] = set()
    for i, obj in enumerate(objects):
        spans = [coords[i]] if coords[i] else []
        anchor = coords[i]
        if obj.label and anchor is not None:
            low = max((c[1] for c in coords[:i] if c), default=0)
            high = min((c[0] for c in coords[i + 1:] if c), default=len(text))
            best: Span | None = None
            for lm in re.finditer(re.escape(obj.label), text[low:high]):
                span = (lm.start() + low, lm.end() + low)
                if span in claimed:
                    continue
                distance = max(span[0] - anchor[1], anchor[0] - span[1])
                if best is None or distance < max(best[0] - anchor[1], anchor[0] - best[1]):
                    best = span
            if best is not None:
                claimed.add(best)
                spans.append(best)
        found.append(spans)
    return found


def score_objects(text: str, objects: Sequence[RawObject], tokens: Sequence[str] | None,
                  logprobs: Sequence[float] | None) -> list[float | None]:
    """One score per object (None where its tokens cannot be found)."""
    if not objects:
        return []
    if not tokens or logprobs is None or len(tokens) != len(logprobs):
        return [None] * len(objects)
    spans = token_spans(text, tokens)
    if spans is None:
        return [None] * len(objects)
    scores: list[float | None] = []
    for object_spans in locate(text, objects):
        picked = [lp for (a, b), lp in zip(spans, logprobs, strict=True)
                  if b > a and any(a < e and s < b for s, e in object_spans)]
        scores.append(math.exp(sum(picked) / len(picked)) if picked else None)
    return scores
