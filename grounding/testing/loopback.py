"""A tiny OpenAI-compatible chat-completions server on 127.0.0.1, for tests, benchmarks and
offline demos.

It is an ``aiohttp.web`` application (aiohttp comes with ``openai[aiohttp]``; Pillow and
numpy read the images it receives). Nothing leaves the machine, so it is the way to try
the remote backend, its retries and its error messages without a GPU, a key or a network::

    from grounding.backends.remote.client import OpenAIBackend
    from grounding.pipeline.detector import Detector
    from grounding.testing.loopback import LoopbackServer, grounding_handler

    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = OpenAIBackend("loopback", base_url=server.base_url, dialect="qwen2.5-vl")
        print(Detector(backend).detect("photo.jpg", prompt="the red box"))

The server runs its own asyncio loop in a daemon thread (so it never keeps a process
alive) and serves many requests at once: waiting is ``await asyncio.sleep``, so 64
concurrent requests with a fixed latency cost it almost nothing.

Routes:

* ``POST {path}`` (default ``/v1/chat/completions``; any path, so a provider-specific one
  such as Segmind's ``/v1/qwen2-vl-7b-instruct`` works): answered by the ``handler``;
* ``GET /v1/models`` (``models_path``): the ``models`` list, OpenAI style.

Behaviour is pluggable. A handler is a callable ``handler(request) -> reply`` (sync or
async) that receives a :class:`LoopbackRequest` (path, headers, JSON body, helpers that
decode the data-URL images) and returns a :class:`Reply`, or a ``(status, headers, body)``
tuple whose body is bytes, text or a JSON-able value. Ready-made behaviours:

* :func:`grounding_handler`: finds the pure-red rectangle in the image it received and
  answers with its box in a dialect's syntax and coordinate frame, like a perfect model;
* :func:`scene_handler`: a perfect but short-sighted model for the synthetic scenes of
  :mod:`grounding.testing.scenes` (solid red, green, blue boxes on a grey ground): every
  object of the classes the prompt names, in the dialect's syntax and frame, but only
  those at least ``min_size`` pixels on both sides in the frame it received (so the small
  objects of a 4032x3024 photo need tiles); it can also write each object ``duplicates``
  more times a pixel or two off, repeat its last line until the token limit
  (``repeat_until_limit``: cut there, finish_reason "length"), and answer only about the
  first class named (``first_only``, like the models that ground one reference);
* :func:`fixed_handler`: a fixed small grounding answer, without looking at the image;
* :func:`scripted`: a sequence of replies for the first calls (per call count, or per key
  such as the image size), then a handler; the fault replies :func:`rate_limited`,
  :func:`server_error`, :func:`dropped`, :func:`garbage`, :func:`no_choices`,
  :func:`openai_error`, :func:`qianfan_error`, :func:`dashscope_error`,
  :func:`segmind_no_credits` and :func:`slow` script the failures real providers produce.

``LoopbackServer(latency=L, capacity=C)`` answers every request after ``L`` seconds with at
most ``C`` requests served at once (the rest queue), the shape of a real inference server
for throughput benchmarks. Every request is recorded (``server.requests``) and the most
requests in flight at once is kept (``server.max_in_flight``).

Chat requests are checked as vLLM checks them before any handler sees them
(:func:`chat_request_problem`): a body vLLM answers with 400 gets that 400 here too
(``validate=False`` turns it off), so a client that sends what vLLM refuses fails its
tests here rather than against a real server.

From the command line, for trying ``--backend openai`` offline::

    python -m grounding.testing.loopback --port 8000 --dialect qwen2.5-vl [--latency 0.2]

serves :func:`grounding_handler` answers for that dialect and prints its base URL; Ctrl-C
or SIGTERM stops it. With ``--scene`` it serves :func:`scene_handler` instead, for images
made by :mod:`grounding.testing.scenes`::

    python -m grounding.testing.loopback --scene --min-size 16 --duplicates 1 \\
        [--repeat-until-limit] [--first-only]
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import io
import itertools
import json
import random
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web

from grounding.testing.answers import answer_objects, answer_text

__all__ = [
    "LoopbackRequest",
    "LoopbackServer",
    "Reply",
    "answer_objects",
    "answer_text",
    "as_reply",
    "chat_request_problem",
    "classes_asked",
    "completion",
    "dashscope_error",
    "decode_data_url",
    "dropped",
    "fixed_handler",
    "garbage",
    "grounding_handler",
    "no_choices",
    "openai_error",
    "qianfan_error",
    "rate_limited",
    "red_box",
    "requested_max_tokens",
    "scene_handler",
    "scripted",
    "segmind_no_credits",
    "server_error",
    "slow",
    "token_logprob",
    "tokenize",
    "vllm_error",
]

DEFAULT_PATH = "/v1/chat/completions"
DEFAULT_MODELS = ("loopback-qwen2.5-vl",)
FIXED_ANSWER = '```json\n[{"bbox_2d": [10, 20, 110, 120], "label": "object"}]\n```'
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_LOGPROBS = 20
"""The most ``top_logprobs`` a request may ask for (vLLM's ``--max-logprobs`` default)."""
ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})


# ------------------------------------------------------------------------------ requests


@dataclass
class LoopbackRequest:
    """One HTTP request as the server received it."""

    index: int
    """0-based arrival order among all requests this server received."""
    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased (``request.headers["authorization"]``)."""
    body: bytes
    json: Any = None
    """The body parsed as JSON, or None when it is not JSON."""
    received_at: float = 0.0
    """``time.perf_counter()`` when the body was complete."""

    @property
    def model(self) -> str | None:
        return self.json.get("model") if isinstance(self.json, dict) else None

    @property
    def messages(self) -> list[dict]:
        messages = self.json.get("messages") if isinstance(self.json, dict) else None
        return messages if isinstance(messages, list) else []

    @property
    def wants_logprobs(self) -> bool:
        return isinstance(self.json, dict) and bool(self.json.get("logprobs"))

    def parts(self, kind: str) -> list[dict]:
        """Every content part of type ``kind`` (``"text"``, ``"image_url"``) in order."""
        found = []
        for message in self.messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                found.extend(p for p in content if isinstance(p, dict) and p.get("type") == kind)
        return found

    @property
    def text(self) -> str:
        """All text the user and system messages hold, joined by newlines."""
        texts = []
        for message in self.messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(str(p.get("text", "")) for p in content
                             if isinstance(p, dict) and p.get("type") == "text")
        return "\n".join(texts)

    def image_urls(self) -> list[str]:
        urls = []
        for part in self.parts("image_url"):
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if isinstance(url, str):
                urls.append(url)
        return urls

    def image_bytes(self) -> list[tuple[str, bytes]]:
        """(media type, encoded bytes) of every ``data:`` URL image, in order."""
        return [decode_data_url(url) for url in self.image_urls()]

    def images(self) -> list[Any]:
        """Every ``data:`` URL image decoded into a PIL image (as stored: no EXIF applied)."""
        from PIL import Image

        found = []
        for _, data in self.image_bytes():
            image = Image.open(io.BytesIO(data))
            image.load()
            found.append(image)
        return found

    def image(self) -> Any:
        """The image the request asks about: the last one (any before it are reference
        examples); ValueError when there is none."""
        images = self.images()
        if not images:
            raise ValueError("the request holds no data: URL image")
        return images[-1]


_DATA_URL = re.compile(r"^data:(?P<type>[\w.+/-]*)(?P<params>(?:;[^,;]*)*?)(?P<b64>;base64)?,",
                       re.I)


def decode_data_url(url: str) -> tuple[str, bytes]:
    """``data:image/png;base64,...`` -> ("image/png", bytes); ValueError if not a data URL."""
    m = _DATA_URL.match(url)
    if not m:
        raise ValueError(f"not a data: URL: {url[:40]!r}")
    payload = url[m.end():]
    if not m.group("b64"):
        from urllib.parse import unquote_to_bytes

        return m.group("type") or "text/plain", unquote_to_bytes(payload)
    try:
        return m.group("type"), base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in data: URL: {exc}") from None


# ------------------------------------------------------------------------------- replies


@dataclass
class Reply:
    """What the server answers to one request."""

    status: int = 200
    body: Any = None
    """bytes as they are; str as UTF-8 text; anything else as JSON. None: no body."""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (on top of the server's ``latency``)."""
    drop: bool = False
    """Close the connection without sending anything."""

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        names = {k.lower() for k in headers}
        if self.body is None:
            data = b""
        elif isinstance(self.body, bytes | bytearray):
            data = bytes(self.body)
        elif isinstance(self.body, str):
            data = self.body.encode("utf-8")
            if "content-type" not in names:
                headers["Content-Type"] = "text/plain; charset=utf-8"
        else:
            data = json.dumps(self.body, ensure_ascii=False).encode("utf-8")
            if "content-type" not in names:
                headers["Content-Type"] = "application/json"
        return data, headers


ReplyLike = Reply | tuple
Handler = Callable[[LoopbackRequest], "ReplyLike | Awaitable[ReplyLike]"]


def as_reply(value: Any) -> Reply:
    """A handler's return value as a Reply: a Reply, ``(status, headers, body)``,
    ``(status, body)`` or a bare JSON-able body (status 200)."""
    if isinstance(value, Reply):
        return value
    if isinstance(value, tuple):
        if len(value) == 3:
            status, headers, body = value
            return Reply(int(status), body, dict(headers or {}))
        if len(value) == 2:
            return Reply(int(value[0]), value[1])
        raise TypeError(f"a reply tuple is (status, headers, body), not {len(value)} items")
    return Reply(200, value)


async def _call(handler: Callable[[LoopbackRequest], Any], request: LoopbackRequest) -> Reply:
    value = handler(request)
    if inspect.isawaitable(value):
        value = await value
    return as_reply(value)


# ------------------------------------------------------------- vLLM's request checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_request_problem(body: Any, max_logprobs: int = MAX_LOGPROBS) -> str | None:
    """Why vLLM would answer this chat-completions body with 400, or None when it would
    take it. The checks of vLLM's ChatCompletionRequest and sampling parameters that a
    client can trip over:

    * the body is a JSON object with a non-empty ``messages`` list of objects, each with
      a known ``role``;
    * ``logprobs`` is a boolean; ``top_logprobs`` an integer from 0 to ``max_logprobs``
      (vLLM's ``--max-logprobs``, 20), and above 0 only with ``logprobs`` true ("when
      using `top_logprobs`, `logprobs` must be set to true");
    * ``max_tokens`` / ``max_completion_tokens`` are integers of at least 1;
    * ``temperature`` is a non-negative number; ``n`` an integer of at least 1.
    """
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    messages = body.get("messages")
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list) or not messages:
        return "messages: Input should be a non-empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages.{i}: a message needs a role among {', '.join(sorted(ROLES))}"
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        return "logprobs: Input should be a valid boolean"
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top):
            return "top_logprobs: Input should be a valid integer"
        if top < 0:
            return "Value error, `top_logprobs` must be a positive value."
        if top > 0 and not logprobs:
            return "Value error, when using `top_logprobs`, `logprobs` must be set to true."
        if top > max_logprobs:
            return (f"Requested sample logprobs of {top}, which is greater than max allowed: "
                    f"{max_logprobs}")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value):
            return f"{key}: Input should be a valid integer"
        if value < 1:
            return f"max_tokens must be at least 1, got {value}."
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            return "temperature: Input should be a valid number"
        if temperature < 0:
            return f"temperature must be non-negative, got {temperature}."
    n = body.get("n")
    if n is not None and (not _is_int(n) or n < 1):
        return f"n must be at least 1, got {n}."
    return None


def vllm_error(message: str, status: int = 400) -> Reply:
    """vLLM's error answer: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "BadRequestError" if status == 400 else HTTPStatus(status).phrase.replace(" ", "")
    return Reply(status, {"error": {"message": message, "type": kind, "param": None,
                                    "code": status}})


# ------------------------------------------------------------- OpenAI-style completions


_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """A stand-in tokenizer: words, runs of spaces and single punctuation marks. The
    tokens concatenate back to ``text``."""
    return _TOKEN.findall(text)


def token_logprob(index: int) -> float:
    """The made-up log-probability of the ``index``-th generated token (deterministic)."""
    return -round(0.001 * (1 + index % 7), 6)


_ids = itertools.count(1)


def completion(text: str, *, model: str | None = None, finish_reason: str | None = "stop",
               logprobs: bool = False, prompt_tokens: int = 100) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` body answering ``text``; with ``logprobs``, a
    ``logprobs.content`` list of {token, logprob, bytes, top_logprobs} entries as vLLM and
    OpenAI send."""
    tokens = tokenize(text)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
        "logprobs": None,
    }
    if logprobs:
        choice["logprobs"] = {"content": [
            {"token": t, "logprob": token_logprob(i), "bytes": list(t.encode("utf-8")),
             "top_logprobs": []}
            for i, t in enumerate(tokens)
        ]}
    return {
        "id": f"chatcmpl-loopback-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or DEFAULT_MODELS[0],
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                  "total_tokens": prompt_tokens + len(tokens)},
    }


def fixed_handler(text: str = FIXED_ANSWER, *, finish_reason: str | None = "stop") -> Handler:
    """Answer ``text`` to every request without looking at it (benchmarks)."""

    def handle(request: LoopbackRequest) -> Reply:
        return Reply(200, completion(text, model=request.model, finish_reason=finish_reason,
                                     logprobs=request.wants_logprobs))

    return handle


# ----------------------------------------------------------------- grounding behaviour


def red_box(image: Any) -> tuple[int, int, int, int] | None:
    """The box (pixel edges: x_min, y_min, x_max, y_max) of the red pixels of ``image``.

    A pixel is red when ``R - (G + B) / 2`` exceeds half its value for pure red (127.5),
    i.e. when it is nearer pure red than a grey background: a resize blends an edge pixel
    by how much of it the red covers, so the box found this way is the true rectangle's
    box to within half a pixel of ``image``. Each edge is the median over the rows (or
    columns) that hold red, not the extreme: a bicubic resize rings near the corners and
    would push the extreme out by a pixel. None when there is no red pixel.
    """
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    red = (a[..., 0] - (a[..., 1] + a[..., 2]) / 2) > 127.5
    rows = np.flatnonzero(red.any(axis=1))
    cols = np.flatnonzero(red.any(axis=0))
    if not rows.size:
        return None

    def median(values: np.ndarray) -> int:
        return int(np.sort(values)[(len(values) - 1) // 2])

    across = red[rows]  # rows holding red: where their red run starts and ends
    x0 = median(np.argmax(across, axis=1))
    x1 = median(red.shape[1] - np.argmax(across[:, ::-1], axis=1))
    down = red[:, cols]
    y0 = median(np.argmax(down, axis=0))
    y1 = median(red.shape[0] - np.argmax(down[::-1], axis=0))
    return x0, y0, x1, y1


def grounding_handler(dialect: Any = "qwen2.5-vl", server_frame: tuple[int, int] | None = None,
                      *, label: str = "red box", finish_reason: str | None = "stop",
                      text: Callable[[str], str] | None = None) -> Handler:
    """A perfect grounding model: finds the pure-red rectangle in the image it received and
    answers with its box in ``dialect``'s syntax and coordinate frame.

    * ``qwen2.5-vl``: absolute pixels of the image received;
    * ``qwen3-vl``, ``qwen2-vl``, ``qwen-vl``: 0-1000 relative; ``deepseek-vl2``: 0-999.

    ``server_frame`` (width, height): the server resizes the image it received to this size
    first, like a server that applies its own processor resize. Relative answers still map
    back exactly; an absolute (qwen2.5-vl) answer is then in ``server_frame`` pixels, which
    is the mismatch such a server causes. ``text`` post-edits the answer (e.g. to cut it).
    The reply carries ``finish_reason``, usage and, when asked, ``logprobs.content``.
    """
    from PIL import Image

    from grounding.core.dialects import get_dialect

    d = get_dialect(dialect)

    def handle(request: LoopbackRequest) -> Reply:
        try:
            image = request.image().convert("RGB")
        except (ValueError, OSError) as exc:
            return Reply(400, {"error": {"message": f"cannot read the image: {exc}",
                                         "type": "invalid_request_error", "code": None}})
        if server_frame is not None and image.size != tuple(server_frame):
            image = image.resize(tuple(server_frame), Image.Resampling.BICUBIC)
        found = red_box(image)
        box = None
        if found is not None:
            w, h = image.size
            if d.is_relative:
                assert d.norm is not None
                box = (found[0] / w * d.norm, found[1] / h * d.norm,
                       found[2] / w * d.norm, found[3] / h * d.norm)
            else:
                box = found
        answer = answer_text(d, box, label)
        if text is not None:
            answer = text(answer)
        return Reply(200, completion(answer, model=request.model, finish_reason=finish_reason,
                                     logprobs=request.wants_logprobs))

    return handle


def requested_max_tokens(request: LoopbackRequest, default: int) -> int:
    """The generation limit the request asks for (``max_tokens``, else
    ``max_completion_tokens``), else ``default``."""
    body = request.json if isinstance(request.json, dict) else {}
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if _is_int(value) and value >= 1:
            return value
    return default


def classes_asked(text: str, names: Iterable[str], *, first_only: bool = False) -> list[str]:
    """The class names that ``text`` mentions (ignoring case), in the order it first
    mentions them; only the first with ``first_only``."""
    lowered = text.lower()
    found = sorted((lowered.find(n.lower()), n) for n in names if n.lower() in lowered)
    named = [n for _, n in found]
    return named[:1] if first_only else named


def _duplicated(objects: list[tuple[str, tuple[int, int, int, int]]], copies: int,
                size: tuple[int, int]) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Each object followed by ``copies`` more of it, a third of them identical, the rest
    with each edge moved by up to 2 px (1 px on objects under 40 px), so that a copy
    overlaps its object at an IoU above 0.75: the near-duplicates a grounding model
    writes. Deterministic in the objects and ``size``."""
    if copies <= 0:
        return objects
    w, h = size
    rng = random.Random(f"{size}:{objects}")
    out = []
    for label, box in objects:
        out.append((label, box))
        reach = 1 if min(box[2] - box[0], box[3] - box[1]) < 40 else 2
        for _ in range(copies):
            if rng.random() < 1 / 3:
                out.append((label, box))
                continue
            x1, y1, x2, y2 = (v + rng.randint(-reach, reach) for v in box)
            x1, y1 = min(max(0, x1), w - 1), min(max(0, y1), h - 1)
            out.append((label, (x1, y1, max(x1 + 1, min(w, x2)), max(y1 + 1, min(h, y2)))))
    return out


def scene_handler(dialect: Any = "qwen2.5-vl", *, min_size: int = 16, duplicates: int = 0,
                  repeat_until_limit: bool = False, first_only: bool = False,
                  classes: Mapping[str, tuple[int, int, int]] | None = None,
                  max_tokens: int = 2048) -> Handler:
    """A perfect but short-sighted grounding model for :mod:`grounding.testing.scenes`
    images: it finds every solid-colour object of the classes the prompt names in the
    image it received (:func:`~grounding.testing.scenes.colour_boxes`) and answers with
    their boxes in ``dialect``'s syntax and coordinate frame, labelled with the class.

    * It sees only objects whose box is at least ``min_size`` pixels on both sides *in the
      frame it received*: small objects of a large image shrink below that when the
      client scales the image down to its pixel budget, and are found again in a tile
      sent at close to full resolution.
    * It answers about the classes (``classes``: name -> pure colour, default
      :data:`~grounding.testing.scenes.DEFAULT_CLASSES`) whose name the prompt mentions,
      in the order the prompt first names them, each class top to bottom; none named:
      an empty answer. ``first_only``: only the first class named, like the models that
      ground one referring expression (Qwen-VL, Qwen2-VL, DeepSeek-VL2 given a list).
    * ``duplicates=N``: each object is written N more times right after it, a third of
      the copies identical and the rest a pixel or two off.
    * ``repeat_until_limit``: after the objects, the last one is written again and again
      until the request's ``max_tokens`` (``max_tokens`` when it sets none), counted with
      :func:`tokenize`; the answer is cut there with ``finish_reason`` "length", like a
      degenerating model.

    Any answer longer than the request's token limit is cut there ("length"). The work
    runs in a worker thread, so concurrent requests are served in parallel.
    """
    from grounding.core.dialects import get_dialect
    from grounding.testing.scenes import DEFAULT_CLASSES

    d = get_dialect(dialect)
    colours = dict(classes or DEFAULT_CLASSES)

    def answer(request: LoopbackRequest) -> Reply:
        from grounding.testing.scenes import colour_boxes

        try:
            image = request.image()
        except (ValueError, OSError) as exc:
            return Reply(400, {"error": {"message": f"cannot read the image: {exc}",
                                         "type": "invalid_request_error", "code": None}})
        asked = classes_asked(request.text, colours, first_only=first_only)
        found = colour_boxes(image, {n: colours[n] for n in asked},
                             min_size=min_size) if asked else []
        found.sort(key=lambda o: asked.index(o[0]))  # stable: each class top to bottom
        objects = _duplicated(found, duplicates, image.size)
        w, h = image.size
        written: list[tuple[Sequence[float], str]] = []
        for label, box in objects:
            if d.is_relative:
                assert d.norm is not None
                written.append(((box[0] / w * d.norm, box[1] / h * d.norm,
                                 box[2] / w * d.norm, box[3] / h * d.norm), label))
            else:
                written.append((box, label))
        limit = requested_max_tokens(request, max_tokens)
        text = answer_objects(d, written)
        if repeat_until_limit and written:
            more = 8
            while len(tokenize(text)) <= limit:
                text = answer_objects(d, written + [written[-1]] * more)
                more *= 2
        tokens = tokenize(text)
        finish = "stop"
        if len(tokens) > limit:
            text, finish = "".join(tokens[:limit]), "length"
        return Reply(200, completion(text, model=request.model, finish_reason=finish,
                                     logprobs=request.wants_logprobs))

    async def handle(request: LoopbackRequest) -> Reply:
        return await asyncio.to_thread(answer, request)

    return handle


# ------------------------------------------------------------------------ fault replies


def openai_error(status: int = 400, message: str = "Invalid request",
                 type: str = "invalid_request_error", code: str | None = None) -> Reply:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return Reply(status, {"error": {"message": message, "type": type, "param": None,
                                    "code": code}})


def rate_limited(retry_after: float | str | None = 0.1,
                 message: str = "Rate limit reached for requests") -> Reply:
    """429 with ``Retry-After`` (seconds) and an OpenAI-style error body."""
    reply = openai_error(429, message, "rate_limit_exceeded", "rate_limit_exceeded")
    if retry_after is not None:
        reply.headers["Retry-After"] = str(retry_after)
    return reply


def server_error(status: int = 503, message: str | None = None) -> Reply:
    """A 5xx with an OpenAI-style error body."""
    if message is None:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = "Server error"
    return openai_error(status, message, "server_error")


def dropped() -> Reply:
    """Close the connection without answering."""
    return Reply(drop=True)


def garbage(status: int = 200, body: bytes = b"<html><body>502 Bad Gateway</body></html>"
            ) -> Reply:
    """A body that is not JSON (a proxy's HTML page)."""
    return Reply(status, body, {"Content-Type": "text/html"})


def no_choices() -> Reply:
    """A 200 JSON body without ``choices``."""
    return Reply(200, {"id": "chatcmpl-loopback-empty", "object": "chat.completion",
                       "created": int(time.time()), "model": DEFAULT_MODELS[0]})


def qianfan_error(code: int = 336003, msg: str = "the image is invalid") -> Reply:
    """Baidu Qianfan: HTTP 200 with ``{"error_code", "error_msg"}`` in the body."""
    return Reply(200, {"id": "as-loopback", "error_code": code, "error_msg": msg})


def dashscope_error(code: str = "InvalidParameter", message: str = "url error",
                    status: int = 400) -> Reply:
    """Alibaba DashScope: ``{"code", "message", "request_id"}``."""
    return Reply(status, {"code": code, "message": message,
                          "request_id": "00000000-loopback"})


def segmind_no_credits(message: str = "Not enough credits") -> Reply:
    """Segmind: 406 when the account has no credits left."""
    return Reply(406, {"error": message})


def slow(seconds: float, reply: ReplyLike | None = None) -> Reply:
    """Answer ``reply`` (default: a valid empty grounding answer) after ``seconds``."""
    out = as_reply(reply) if reply is not None else Reply(200, completion("```json\n[]\n```"))
    return Reply(out.status, out.body, dict(out.headers), out.delay + seconds, out.drop)


def scripted(steps: Iterable[Any], then: Handler | None = None, *,
             key: Callable[[LoopbackRequest], Any] | None = None,
             when: Callable[[LoopbackRequest], bool] | None = None) -> Handler:
    """Answer the first calls with ``steps`` in turn, every later call with ``then``.

    A step is a reply (a :class:`Reply` or a tuple) or a handler. Calls are counted over
    the requests ``when`` accepts (default: all; the others go straight to ``then``), and
    separately per ``key(request)`` when ``key`` is given, so
    ``scripted([server_error()], ok, key=lambda r: r.image().size)`` fails the first
    request of every image size once. ``then`` defaults to :func:`fixed_handler`.
    """
    script = list(steps)
    after = then or fixed_handler()
    counts: dict[Any, int] = {}

    async def handle(request: LoopbackRequest) -> Reply:
        if when is not None and not when(request):
            return await _call(after, request)
        k = key(request) if key is not None else None
        n = counts.get(k, 0)
        counts[k] = n + 1
        if n >= len(script):
            return await _call(after, request)
        step = script[n]
        if callable(step):
            return await _call(step, request)
        return as_reply(step)

    handle.counts = counts  # type: ignore[attr-defined]
    return handle


# ------------------------------------------------------------------------------- server


class LoopbackServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 in a daemon thread.

    >>> with LoopbackServer(handler=grounding_handler("qwen3-vl")) as server:  # doctest: +SKIP
    ...     server.base_url
    'http://127.0.0.1:41234/v1'

    ``path``: the POST route answered by ``handler`` (default :func:`fixed_handler`);
    ``models_path``: the GET route listing ``models``.
    ``latency``: seconds every answer takes (``jitter``: plus or minus up to this much,
    uniformly); ``capacity``: at most this many requests are being served at once, later
    ones wait their turn (None: no limit). ``lifetime``: stop
    by itself after this many seconds whatever happens (a safety net for demos).
    ``record=False`` keeps no request bodies (long benchmarks); counters still work.
    ``validate``: answer a chat request that vLLM would refuse with vLLM's 400
    (:func:`chat_request_problem`) without calling the handler; ``max_logprobs``: the
    most ``top_logprobs`` accepted (vLLM's ``--max-logprobs``).
    """

    def __init__(self, handler: Handler | None = None, *, path: str = DEFAULT_PATH,
                 port: int = 0, latency: float = 0.0, jitter: float = 0.0,
                 capacity: int | None = None,
                 models: Sequence[str] = DEFAULT_MODELS, models_path: str = "/v1/models",
                 lifetime: float | None = None,
                 record: bool = True, validate: bool = True,
                 max_logprobs: int = MAX_LOGPROBS) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.handler: Handler = handler or fixed_handler()
        self.path = path
        self.port = port
        self.latency = float(latency)
        self.jitter = min(float(jitter), self.latency)
        self.capacity = capacity
        self.models = list(models)
        self.lifetime = lifetime
        self.record = record
        self.validate = validate
        self.max_logprobs = max_logprobs
        self.models_path = models_path
        self.requests: list[LoopbackRequest] = []
        """Every request received, in arrival order (when ``record``)."""
        self.errors: list[BaseException] = []
        """Exceptions raised by handlers (each was answered 500)."""
        self.calls = 0
        """Requests received on ``path``."""
        self.in_flight = 0
        self.max_in_flight = 0
        """Most ``path`` requests received and not yet answered, at any moment."""
        self.connections = 0
        """TCP connections that carried a request."""
        self._count = 0
        self._transports: weakref.WeakSet = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._semaphore: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no path)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def completions(self) -> list[LoopbackRequest]:
        """The recorded requests on ``path`` (the chat completions)."""
        return [r for r in self.requests if r.method == "POST" and r.path == self.path]

    def start(self) -> LoopbackServer:
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()),
                                        name="grounding-loopback", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._startup_error is not None:
            raise RuntimeError(f"loopback server failed to start: {self._startup_error}")
        if not self._ready.is_set():
            raise RuntimeError("loopback server did not start within 10 s")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every connection; idempotent."""
        loop, thread, stop = self._loop, self._thread, self._stop
        if loop is None or thread is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: already stopped
            loop.call_soon_threadsafe(stop.set)
        if thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget the recorded requests and counters (the handler's own state stays)."""
        self.requests.clear()
        self.errors.clear()
        self.calls = 0
        self.max_in_flight = self.in_flight

    async def _serve(self) -> None:
        """The server thread: listen, wait for stop() or ``lifetime``, close everything."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.capacity is not None:
            self._semaphore = asyncio.Semaphore(self.capacity)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._http)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, backlog=1024).start()
            self.port = runner.addresses[0][1]
        except BaseException as exc:  # reported to start()
            self._startup_error = exc
            await runner.cleanup()
            return
        finally:
            self._ready.set()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lifetime)
        finally:
            for task in self._tasks:  # requests still being served are not answered
                task.cancel()
            await runner.cleanup()  # closes the listening socket and every connection

    # ------------------------------------------------------------------------ HTTP

    async def _http(self, http: web.Request) -> web.StreamResponse:
        body = await http.read()
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        headers: dict[str, str] = {}
        for name, value in http.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request = LoopbackRequest(self._count, http.method, http.path, headers, body, parsed,
                                  time.perf_counter())
        self._count += 1
        if self.record:
            self.requests.append(request)
        if http.transport is not None and http.transport not in self._transports:
            self._transports.add(http.transport)
            self.connections += 1
        reply = await self._dispatch(request)
        if reply.drop and http.transport is not None:
            http.transport.abort()  # aiohttp then finds the connection gone and sends nothing
        data, reply_headers = reply.encoded()
        return web.Response(status=reply.status, body=data, headers=reply_headers)

    async def _dispatch(self, request: LoopbackRequest) -> Reply:
        if request.path == self.path:
            if request.method != "POST":
                return Reply(405, {"error": {"message": f"use POST on {self.path}"}},
                             {"Allow": "POST"})
            return await self._complete(request)
        if request.path == self.models_path and request.method == "GET":
            return Reply(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "loopback"}
                for m in self.models]})
        return Reply(404, {"error": {"message": f"no route {request.method} {request.path}",
                                     "type": "invalid_request_error", "code": "not_found"}})

    async def _complete(self, request: LoopbackRequest) -> Reply:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self._semaphore is not None:
                async with self._semaphore:
                    return await self._answer(request)
            return await self._answer(request)
        finally:
            self.in_flight -= 1
            self._tasks.discard(task)

    async def _answer(self, request: LoopbackRequest) -> Reply:
        if self.validate:
            problem = chat_request_problem(request.json, self.max_logprobs)
            if problem is not None:  # vLLM refuses before the model sees anything
                return vllm_error(problem)
        if self.latency > 0:
            delay = self.latency
            if self.jitter:
                delay += random.uniform(-self.jitter, self.jitter)
            await asyncio.sleep(delay)
        try:
            reply = await _call(self.handler, request)
        except Exception as exc:  # a bug in a handler: answer 500, keep it for the test
            self.errors.append(exc)
            reply = server_error(500, f"loopback handler failed: {type(exc).__name__}: {exc}")
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        return reply


# ----------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grounding.testing.loopback``: serve a perfect grounding model offline
    until Ctrl-C or SIGTERM."""
    import argparse
    import signal
    import sys

    from grounding.core.dialects import DIALECTS, get_dialect

    parser = argparse.ArgumentParser(
        prog="python -m grounding.testing.loopback",
        description="An OpenAI-compatible server on 127.0.0.1 that answers like a perfect "
                    "grounding model: the box of the pure-red pixels of the image it gets, "
                    "in the dialect's syntax and frame (an empty answer when there are "
                    "none). For trying --backend openai without a GPU or a network.")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--dialect", default="qwen2.5-vl", choices=sorted(DIALECTS),
                        help="how the answers are written (default qwen2.5-vl)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds each answer takes (default 0)")
    parser.add_argument("--label", default="red box",
                        help="the label of the box (not with --scene)")
    parser.add_argument("--scene", action="store_true",
                        help="answer like a short-sighted model for grounding.testing.scenes "
                             "images: every red/green/blue box of the classes the prompt "
                             "names ('red box', 'green box', 'blue box')")
    parser.add_argument("--min-size", type=int, default=16,
                        help="--scene: the smallest side, in pixels of the frame received, "
                             "of an object the model sees (default 16)")
    parser.add_argument("--duplicates", type=int, default=0,
                        help="--scene: write each object this many more times (default 0)")
    parser.add_argument("--repeat-until-limit", action="store_true",
                        help="--scene: repeat the last object until the token limit")
    parser.add_argument("--first-only", action="store_true",
                        help="--scene: answer only about the first class the prompt names")
    parser.add_argument("--model", default=None,
                        help="the model name /v1/models lists (default loopback-DIALECT, "
                             "from which grounding guesses the dialect)")
    args = parser.parse_args(argv)
    dialect = get_dialect(args.dialect)
    model = args.model or f"loopback-{dialect.name}"
    if args.scene:
        handler = scene_handler(dialect, min_size=args.min_size, duplicates=args.duplicates,
                                repeat_until_limit=args.repeat_until_limit,
                                first_only=args.first_only)
    else:
        handler = grounding_handler(dialect, label=args.label)
    server = LoopbackServer(handler=handler, port=args.port, latency=args.latency,
                            models=[model], record=False)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        server.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kind = "scene, " if args.scene else ""
    # Nothing glued to the URL: a double-click copies it whole.
    print(f"loopback server ({kind}{dialect.name}, model {model}) at {server.base_url} "
          "(Ctrl-C stops it)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    print("loopback server stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
