"""Runaway repetition: an answer that has degenerated into writing the same object text
over and over, until the token limit.

A degenerating model ends its answer with one piece of text (the *unit*) written again
and again, ``{"bbox_2d": [12, 40, 88, 97], "label": "cup"},`` thirty times, usually cut
in the middle of the last copy by the token limit. The rule, the same on characters
(:func:`repeating_tail`, what a server sent) and on token ids (:func:`repeating_ids`,
checked at every decoding step of the local backend, which stops the row there;
a server's answer is only flagged):

* the sequence **ends** with one unit written at least ``repeats`` times in a row (the
  last copy may be unfinished: only the tail has to be periodic), the unit being at least
  ``min_unit`` long and holding a digit (an object has coordinates); or
* it ends with one element (a character, a token) written ``repeats * min_unit`` times
  in a row (a model stuck on one token), whatever it is.

Why these defaults (k = :data:`DEFAULT_REPEATS` = 4, a unit of at least
:data:`DEFAULT_MIN_UNIT_CHARS` = 16 characters or :data:`DEFAULT_MIN_UNIT_TOKENS` = 12
tokens, with a digit): a legitimate answer never writes the same object, with the same
coordinates, 4 times in a row (even two identical boxes in a row are a duplicate), so an
object unit repeated 4 times is already the degenerate loop, and stopping it there costs
nothing that a longer loop would have added. The smallest object text is about that long
(a Qwen2.5-VL point ``{"point_2d": [5, 7], "label": "a"}`` is 36 characters and about 20
tokens, Qwen writing each digit as its own token; a DeepSeek-VL2 box over 40 characters).
The digit keeps text that legitimately repeats, such as the empty cells of an HTML table
(``<td></td><td></td>...``), from counting; a larger minimum unit only makes loops of a
shorter unit be caught a few copies later, never missed (a text repeating a short unit is
also periodic in any multiple of it). One token written 48 times in a row (one
character 64 times) is longer than any real answer writes (Qwen has single tokens for
long runs of spaces and dashes) and is never a grounding answer.

At the end of a text, whitespace, commas and the brackets and fence that close a list
(:data:`IGNORED_TAIL`) are ignored: a loop that ended, or that the model closed, is still
a loop. The token check ignores nothing, since it runs as each token is written.

The checks are fast: the only periods tried are those where the last element recurs
(found with ``index`` on a reversed window, in C), each rejected on a short comparison
unless it really repeats; the token check looks at most :data:`DEFAULT_MAX_UNIT_TOKENS`
back, so a decoding step costs microseconds.

Pure: no torch, no tokenizer. The local backend's stopping criterion is in
grounding.backends.token_scores.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_REPEATS = 4
"""Copies in a row that make an answer runaway repetition (``stop_repeats``)."""

DEFAULT_MIN_UNIT_CHARS = 16
"""The shortest unit, in characters, that counts as a repeated object (text check): a
Qwen2-VL box whose tokens a server stripped, ``(877,629),(904,653)``, is 19."""

DEFAULT_MIN_UNIT_TOKENS = 12
"""The shortest unit, in tokens, that counts as a repeated object (token check)."""

DEFAULT_MAX_UNIT_TOKENS = 200
"""The longest unit the per-step token check looks for (a Qwen box line is about 30
tokens, a nested-label object about 60)."""

DIGITS = frozenset("0123456789")

IGNORED_TAIL = " \t\r\n,]})`"
"""What :func:`repeating_tail` ignores at the end of an answer: whitespace, commas, and
the brackets and fence that close a list (a model may close the list after its loop)."""

MAX_IGNORED = 16
"""The most ignored characters at the end of which :func:`repeating_tail` tries each."""


@dataclass(frozen=True)
class Repetition:
    """Where a sequence (text or token ids) ends in runaway repetition."""

    start: int
    """Index of the first element of the repeating tail, as far back as it repeats: it
    may lie inside the object written before the first copy, where that object ends as a
    copy does (``"},\n``). Everything before it was written before the loop, and
    ``seq[:start + 2 * unit]`` holds at least one whole copy."""
    unit: int
    """Length of one copy (1 for a run of one element)."""
    copies: int
    """Whole units from ``start`` (an unfinished last copy is not counted)."""


def repeating_tail(text: str, *, repeats: int = DEFAULT_REPEATS,
                   min_unit: int = DEFAULT_MIN_UNIT_CHARS) -> Repetition | None:
    """Where ``text`` ends in one unit of at least ``min_unit`` characters, holding a
    digit, written at least ``repeats`` times in a row (or in one character written
    ``repeats * min_unit`` times), ignoring an unfinished last copy and the trailing
    :data:`IGNORED_TAIL` characters; None when it does not (or ``repeats`` is 0).
    Indices refer to ``text``."""
    _check(repeats, min_unit)
    if not repeats:
        return None
    # The loop may end anywhere in the ignored characters (its copies end in ",\n", the
    # list was closed after it): each end between the text's and the stripped text's is
    # tried, the last MAX_IGNORED of them (a longer tail is a run, found at the end).
    stripped = len(text.rstrip(IGNORED_TAIL))
    ends = range(len(text), max(stripped, len(text) - MAX_IGNORED) - 1, -1)
    for end in (*ends, stripped) if stripped < ends[-1] else ends:
        found = _tail(text[:end], repeats, min_unit, None, _has_digit_char)
        if found is not None:
            return found
    return None


def repeating_ids(ids: Sequence[int] | Any, *, repeats: int = DEFAULT_REPEATS,
                  min_unit: int = DEFAULT_MIN_UNIT_TOKENS,
                  max_unit: int | None = DEFAULT_MAX_UNIT_TOKENS,
                  digits: Container[int] | None = None) -> Repetition | None:
    """The rule of :func:`repeating_tail` on token ids (a list, or anything with
    ``tolist``: a 1-D tensor): the last ``repeats * p`` ids are ``p``-periodic for some
    ``min_unit <= p <= max_unit`` whose unit holds an id of ``digits`` (the ids whose text
    has a digit; None: any unit counts), or the last ``repeats * min_unit`` ids are one
    id. Nothing is ignored at the end: it is called on every step."""
    _check(repeats, min_unit)
    if not repeats:
        return None
    if not isinstance(ids, list):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if digits is None:
        has_digit: Callable[[Sequence[int]], bool] = _always
    else:
        def has_digit(unit: Sequence[int]) -> bool:
            return any(t in digits for t in unit)
    return _tail(ids, repeats, min_unit, max_unit, has_digit)


def check_repeats(repeats: int) -> None:
    """ValueError unless ``repeats`` (the ``--stop-repeats`` setting) is 0 (off) or at
    least 3: one copy is no repetition, and two identical object lines are a duplicate
    that real answers write (dedup removes it), not a loop to stop."""
    if repeats < 0 or repeats in (1, 2):
        raise ValueError(f"--stop-repeats must be 0 (off) or at least 3, not {repeats}: "
                         "two identical object lines are a duplicate, not a loop")


def _check(repeats: int, min_unit: int) -> None:
    if repeats < 0 or repeats == 1:  # 0: off
        raise ValueError(f"repeats must be 0 (off) or at least 2, not {repeats}")
    if min_unit < 1:
        raise ValueError(f"min_unit must be at least 1, not {min_unit}")


def _has_digit_char(unit: str) -> bool:
    return not DIGITS.isdisjoint(unit)


def _always(unit: Sequence[int]) -> bool:
    return True


def _tail(seq: Any, repeats: int, min_unit: int, max_unit: int | None,
          has_digit: Callable[[Any], bool]) -> Repetition | None:
    """The rule on a str or a list (both slice, compare, ``count`` and ``index``)."""
    n = len(seq)
    if n < 2:
        return None
    last = seq[-1]
    run = repeats * min_unit
    if n >= run and seq[-2] == last and seq[n - run:].count(last) == run:
        return _extend(seq, n - run, 1)
    top = n // repeats if max_unit is None else min(max_unit, n // repeats)
    if top < min_unit:
        return None
    # Position n-1-p holds the last element again for each candidate period p: reversed,
    # the window's index i is the period min_unit + i.
    window = seq[n - 1 - top:n - min_unit][::-1]
    quick = min(min_unit, 8)
    i = -1
    while True:
        try:
            i = window.index(last, i + 1)
        except ValueError:
            return None
        p = min_unit + i
        if seq[n - p - quick:n - p] != seq[n - quick:]:
            continue
        span = seq[n - repeats * p:]
        if span[p:] == span[:-p] and has_digit(seq[n - p:]):
            return _extend(seq, n - repeats * p, p)


def _extend(seq: Any, start: int, p: int) -> Repetition:
    """The repetition found from ``start``, extended back as far as the tail repeats."""
    block = max(p, 64)  # whole blocks first: a 10k-character loop is 150 comparisons
    while start >= block and seq[start - block:start] == seq[start - block + p:start + p]:
        start -= block
    while start > 0 and seq[start - 1] == seq[start - 1 + p]:
        start -= 1
    return Repetition(start=start, unit=p, copies=(len(seq) - start) // p)
