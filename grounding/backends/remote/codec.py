"""What goes over the wire, both ways: images as data URLs in their model frames, the chat
request body, and the answer read back into a ``Generation``.

No HTTP and no event loop here: these are (almost all) pure functions of their arguments,
so the format that a server sees, and what is made of its answer, can be tested without a
server. The one piece with state is the reference cache of ``ImageEncoder``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from grounding.backends.base import TOP_LOGPROBS, Generation, Request, alternatives
from grounding.backends.remote.retry import RemoteError, provider_message, says_busy
from grounding.core.geometry import Size
from grounding.core.repetition import DEFAULT_REPEATS, repeating_tail

TRUNCATED_REASONS = frozenset({"length", "max_tokens", "max_length", "model_length"})
"""finish_reason values meaning "cut off"; anything else ("stop", Qianfan's "normal",
"eos", None) is a finished answer."""

JPEG_QUALITY = 95
"""Quality of the JPEG the client sends (the default format): visually lossless, and the
coordinates do not depend on it; ``image_format="png"`` sends the frame losslessly."""

REFERENCE_CACHE = 16
"""Reference images whose data URLs are kept (see ImageEncoder.reference_url)."""

SCHEMA_DIALECTS = ("qwen2.5-vl", "qwen3-vl")
"""Dialects that write the box JSON that json_schema describes."""

Frame = Callable[[Size], Size]
"""The size an image of a given size is sent at (a backend's ``frame`` method)."""


def _encode(image: Image.Image, frame: Size, image_format: str) -> str:
    """``image`` resized to ``frame`` as a ``data:image/<format>;base64,...`` URL."""
    if image.size != frame:
        image = image.resize(frame, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/{image_format};base64,{data}"


class ImageEncoder:
    """A request's images as data URLs, each resized to the frame that ``frame`` gives for
    its size. Reference images are encoded once per run, since every request of the run
    shows the same ones (the last REFERENCE_CACHE are kept); safe to call from several
    threads. ``frame`` is passed on each call, not kept: the backend that owns this cache
    is its usual source, and holding its method would tie the two in a reference cycle."""

    def __init__(self) -> None:
        self._references: OrderedDict[int, tuple[Image.Image, str]] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, request: Request, frame: Frame, image_format: str) -> tuple[Size, list[str]]:
        """The target's frame, and the data URLs of the references, then the target."""
        urls = [self.reference_url(r, frame, image_format) for r in request.references]
        target = frame(request.image.size)
        urls.append(_encode(request.image, target, image_format))
        return target, urls

    def reference_url(self, image: Image.Image, frame: Frame, image_format: str) -> str:
        """A reference image's data URL, in its own frame, encoded on its first use."""
        key = id(image)
        with self._lock:  # held while encoding: the other thread waits, not redoes
            hit = self._references.get(key)
            if hit is not None and hit[0] is image:
                self._references.move_to_end(key)
                return hit[1]
            url = _encode(image, frame(image.size), image_format)
            self._references[key] = (image, url)  # the image is kept: its id stays its own
            while len(self._references) > REFERENCE_CACHE:
                self._references.popitem(last=False)
        return url


def json_schema(task: str) -> dict[str, Any]:
    """A response_format that makes a guided-decoding server (vLLM) write valid box JSON."""
    key, n = ("point_2d", 2) if task == "points" else ("bbox_2d", 4)
    item = {
        "type": "object",
        "properties": {
            key: {"type": "array", "items": {"type": "number"}, "minItems": n, "maxItems": n},
            "label": {"type": "string"},
        },
        "required": [key, "label"],
    }
    return {"type": "json_schema",
            "json_schema": {"name": "grounding", "schema": {"type": "array", "items": item}}}


def chat_messages(request: Request, image_urls: Sequence[str],
                  text_first: bool = False) -> list[dict[str, Any]]:
    """The system message, if any, then one user message: the images (references, then the
    target) before the prompt, or after it with ``text_first`` (Qianfan's examples)."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}
                                   for url in image_urls]
    text = {"type": "text", "text": request.prompt}
    messages.append({"role": "user", "content": [text, *parts] if text_first else [*parts, text]})
    return messages


def chat_body(request: Request, image_urls: Sequence[str], *, model: str, dialect: str,
              max_new_tokens: int, token_param: str = "max_tokens", logprobs: bool = True,
              schema: bool = False, text_first: bool = False,
              extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chat-completions request for ``request``: greedy, ``max_new_tokens`` unless the
    request sets its own, the response schema for boxes and points when asked for and the
    dialect writes that JSON, and ``extra_body`` over all of it."""
    body: dict[str, Any] = {"model": model,
                            "messages": chat_messages(request, image_urls, text_first),
                            token_param: request.max_new_tokens or max_new_tokens,
                            "temperature": 0.0}
    if logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = TOP_LOGPROBS
    if schema and dialect in SCHEMA_DIALECTS and request.task in ("boxes", "points"):
        body["response_format"] = json_schema(request.task)  # not yes/no or free answers
    body.update(extra_body or {})
    return body


def read_generation(text: str, frame: Size, *, repeats: int = DEFAULT_REPEATS) -> Generation:
    """A chat-completions answer as a Generation whose coordinates refer to ``frame``;
    RemoteError when it holds no answer: retryable when the body is not JSON at all (a
    proxy's error page, a cut connection) or its error says "busy".

    ``repetition`` is set when the answer ends in one object text written ``repeats``
    times in a row (grounding.core.repetition; 0: never): a server cannot be stopped
    mid-answer, so such an answer is flagged, and ``truncated`` still says whether the
    server cut it at the token limit (a runaway answer usually is both)."""
    try:
        data = json.loads(text)
    except ValueError:
        snippet = " ".join(text.split())[:120]
        raise RemoteError(f"the server's answer is not JSON: {snippet!r}",
                          retryable=True) from None
    detail = provider_message(data) if isinstance(data, dict) else None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices:
        reason = detail or "no choices in the answer"
        raise RemoteError(f"the server returned no answer: {reason}", retryable=says_busy(detail))
    choice = choices[0]
    content = (choice.get("message") or {}).get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RemoteError("the server's answer has no text content")
    tokens, logprobs, top = read_logprobs(choice)
    return Generation(text=content, input_size=frame,
                      truncated=choice.get("finish_reason") in TRUNCATED_REASONS,
                      tokens=tokens, token_logprobs=logprobs, top_logprobs=top,
                      repetition=repeating_tail(content, repeats=repeats) is not None)


def read_logprobs(choice: dict[str, Any]) -> tuple[
        list[str] | None, list[float] | None, list[dict[str, float]] | None]:
    """A choice's tokens, their log-probabilities and the alternatives of each (those
    with the same text summed: base.alternatives); all None when the server sent none."""
    logprobs = choice.get("logprobs")
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not entries:
        return None, None, None
    return ([str(e.get("token", "")) for e in entries],
            [float(e.get("logprob", 0.0)) for e in entries],
            [alternatives((str(t.get("token", "")), float(t.get("logprob", 0.0)))
                          for t in (e.get("top_logprobs") or []) if isinstance(t, dict))
             for e in entries])
