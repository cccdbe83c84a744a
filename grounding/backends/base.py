"""The one narrow interface between backends and the rest of grounding."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

from grounding.core.dialects import Dialect
from grounding.core.geometry import Size

TOP_LOGPROBS = 10
"""How many alternatives per generated token the backends keep."""


def alternatives(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """One step's alternatives as ``{text: log-probability}``; tokens that decode to the
    same text (byte fragments that each decode to U+FFFD, empty strings, the same word
    under two ids) are one entry whose probability is the sum of theirs (log-sum-exp),
    so no alternative is lost and the probabilities still add up."""
    out: dict[str, float] = {}
    for text, logprob in pairs:
        logprob = float(logprob)
        seen = out.get(text)
        if seen is None:
            out[text] = logprob
        elif seen == -math.inf or logprob == -math.inf:
            out[text] = max(seen, logprob)
        else:
            high, low = max(seen, logprob), min(seen, logprob)
            out[text] = high + math.log1p(math.exp(low - high))
    return out


@dataclass(frozen=True)
class Request:
    """One image (upright RGB, original size) and what to ask about it, optionally with
    example images before it."""

    image: Image.Image
    prompt: str
    system: str | None = None
    task: str = "boxes"
    """``boxes`` or ``points``: lets a server constrain its output to the right schema."""
    max_new_tokens: int | None = None
    """Overrides the backend's limit for this request (a yes/no question needs one token)."""
    references: tuple[Image.Image, ...] = ()
    """Example images (upright RGB) shown before ``image`` in the same message: "find more
    like these". Coordinates always refer to ``image``, the last image sent."""


@dataclass
class Generation:
    """What the model wrote for one request, and the frame its coordinates refer to.

    ``input_size`` is read from what the backend actually fed the model (for the local
    backend, ``image_grid_thw``), never assumed. ``token_logprobs`` holds the
    log-probability of each generated token and ``tokens`` its text, so confidences can
    be computed later without re-running the model.
    """

    text: str
    input_size: Size
    truncated: bool = False
    tokens: list[str] | None = None
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None
    """Per generated token, the TOP_LOGPROBS most likely tokens and their log-probabilities
    (what a yes/no question is read from), keyed by token text: tokens with the same
    text share one entry holding their summed probability (:func:`alternatives`), so
    a step may have fewer than TOP_LOGPROBS entries."""
    timings: dict[str, float] = field(default_factory=dict)
    repetition: bool = False
    """The answer ended by repeating the same object text over and over (a degenerating
    model): the local backend stopped it there, a server's answer was found so
    (grounding.core.repetition). The objects written before are still read."""


@dataclass(frozen=True)
class BackendSpec:
    """A backend's settings without its model: what planning the requests about an image
    (:meth:`frame`) and recording a run need. A driver whose model runs in other
    processes (the Ray engine) holds one; it cannot answer a request."""

    model: str
    dialect: Dialect
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_new_tokens: int = 2048
    stop_repeats: int = 0

    def frame(self, image_size: Size) -> Size:
        from grounding.core.geometry import model_frame

        return model_frame(self.dialect, *image_size, min_pixels=self.min_pixels,
                           max_pixels=self.max_pixels)

    def generate(self, requests: list[Request]) -> list[Generation | Exception]:
        raise TypeError(f"{self.model} is described here, not loaded: it runs elsewhere")


@runtime_checkable
class Backend(Protocol):
    model: str
    dialect: Dialect

    def frame(self, image_size: Size) -> Size:
        """The model frame this backend will use for an image of this size."""
        ...

    def generate(self, requests: list[Request]) -> list[Generation | Exception]:
        """One entry per request, in order; a failure is returned, not raised, so one bad
        request does not sink its batch."""
        ...
