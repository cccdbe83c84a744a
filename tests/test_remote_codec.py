"""The remote backend's pure parts, without a server: the request body and images it sends
(codec), how it reads an answer, and when and how long it waits before a retry (retry)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import itertools
import json
import math
import socket
import time

import numpy as np
import pytest
from PIL import Image

import grounding.backends.remote.codec as codec
from grounding.backends.base import TOP_LOGPROBS, Request
from grounding.backends.remote import RemoteError, json_schema
from grounding.backends.remote.codec import ImageEncoder, chat_body, read_generation
from grounding.backends.remote.gate import OrderedGate
from grounding.backends.remote.retry import (
    CONNECT_RETRIES,
    MAX_RETRY_AFTER,
    RetryPolicy,
    credentials,
    describe_status,
    origin,
    provider_message,
    retry_after,
    retryable_status,
    transport_failure,
)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def half(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] // 2, size[1] // 2


def body_for(request: Request, urls=("data:ref", "data:target"), **options):
    defaults = {"model": "m", "dialect": "qwen2.5-vl", "max_new_tokens": 100}
    return chat_body(request, list(urls), **{**defaults, **options})


# -- request body ----------------------------------------------------------------------


@pytest.mark.parametrize("text_first", [False, True])
def test_the_user_message_puts_images_in_order_and_the_text_where_asked(text_first):
    body = body_for(Request(noise((8, 8)), "find cats", system="be exact"),
                    text_first=text_first)
    system, user = body["messages"]
    assert system == {"role": "system", "content": "be exact"}
    parts = user["content"]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert images == ["data:ref", "data:target"]  # references first, the target last
    text_at = [p["type"] for p in parts].index("text")
    assert text_at == (0 if text_first else 2)
    assert parts[text_at]["text"] == "find cats"


def test_the_body_is_greedy_with_the_request_token_limit_and_logprobs():
    body = body_for(Request(noise((8, 8)), "p", max_new_tokens=1),
                    token_param="max_completion_tokens")
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert body["max_completion_tokens"] == 1 and "max_tokens" not in body
    assert body["temperature"] == 0.0
    assert body["logprobs"] is True and body["top_logprobs"] == TOP_LOGPROBS
    plain = body_for(Request(noise((8, 8)), "p"), logprobs=False)
    assert plain["max_tokens"] == 100
    assert "logprobs" not in plain and "top_logprobs" not in plain


@pytest.mark.parametrize(("dialect", "task", "expected"), [
    ("qwen2.5-vl", "boxes", json_schema("boxes")),
    ("qwen3-vl", "points", json_schema("points")),
    ("qwen2.5-vl", "answer", None),  # a yes/no or free answer is not box JSON
    ("deepseek-vl2", "boxes", None),  # writes its own box syntax, not JSON
])
def test_the_response_schema_only_where_the_dialect_writes_box_json(dialect, task, expected):
    body = body_for(Request(noise((8, 8)), "p", task=task), dialect=dialect, schema=True)
    assert body.get("response_format") == expected
    assert "response_format" not in body_for(Request(noise((8, 8)), "p"), schema=False)


def test_json_schema_sizes_boxes_and_points():
    def item(task):
        return json_schema(task)["json_schema"]["schema"]["items"]

    assert item("boxes")["properties"]["bbox_2d"]["minItems"] == 4
    assert item("points")["properties"]["point_2d"]["maxItems"] == 2
    assert item("points")["required"] == ["point_2d", "label"]


def test_extra_body_has_the_last_word():
    extra = {"temperature": 0.7, "top_k": 1}
    body = body_for(Request(noise((8, 8)), "p"), extra_body=extra)
    assert body["temperature"] == 0.7 and body["top_k"] == 1
    assert extra == {"temperature": 0.7, "top_k": 1}


# -- images ----------------------------------------------------------------------------


def test_a_jpeg_frame_decodes_to_the_frame_size():
    request = Request(noise((101, 67)), "p")
    frame, (url,) = ImageEncoder().encode(request, half, "jpeg")
    assert frame == (50, 33)
    assert url.startswith("data:image/jpeg;base64,")
    sent = decode(url)
    assert sent.format == "JPEG" and sent.size == (50, 33)


def test_a_png_frame_is_the_resized_image_exactly():
    image = noise((64, 48), seed=1)
    frame, (url,) = ImageEncoder().encode(Request(image, "p"), half, "png")
    sent = decode(url)
    assert sent.format == "PNG" and sent.size == frame == (32, 24)
    expected = image.resize(frame, Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(sent.convert("RGB")), np.asarray(expected))


def test_references_come_first_in_their_own_frames_and_are_encoded_once(monkeypatch):
    calls = []
    encode = codec._encode

    def counting(image, frame, image_format):
        calls.append(frame)
        return encode(image, frame, image_format)

    monkeypatch.setattr(codec, "_encode", counting)
    encoder = ImageEncoder()
    ref = noise((40, 30), seed=2)
    first = encoder.encode(Request(noise((80, 60)), "p", references=(ref,)), half, "jpeg")
    second = encoder.encode(Request(noise((100, 50)), "p", references=(ref,)), half, "jpeg")
    assert first[0] == (40, 30) and second[0] == (50, 25)
    assert [decode(u).size for u in first[1]] == [(20, 15), (40, 30)]
    assert first[1][0] == second[1][0]
    assert calls == [(20, 15), (40, 30), (50, 25)]  # the reference once, each target once


# -- answers ---------------------------------------------------------------------------


def answer(content, finish_reason="stop", logprobs=None) -> str:
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return json.dumps({"id": "x", "choices": [choice]})


@pytest.mark.parametrize(("reason", "truncated"), [
    ("stop", False), ("normal", False), (None, False), ("length", True), ("max_tokens", True),
])
def test_the_finish_reason_says_whether_the_answer_was_cut(reason, truncated):
    generation = read_generation(answer("[]", reason), (30, 20))
    assert generation.text == "[]"
    assert generation.input_size == (30, 20)
    assert generation.truncated is truncated
    assert generation.tokens is None and generation.token_logprobs is None
    assert generation.top_logprobs is None


def test_logprobs_and_content_parts_are_read():
    entries = [{"token": "yes", "logprob": -0.1,
                "top_logprobs": [{"token": "yes", "logprob": -0.1},
                                 {"token": "no", "logprob": -2.5}]},
               {"token": "!", "logprob": -1.0}]
    parts = [{"type": "text", "text": "ye"}, {"type": "text", "text": "s!"}]
    generation = read_generation(answer(parts, logprobs={"content": entries}), (8, 8))
    assert generation.text == "yes!"
    assert generation.tokens == ["yes", "!"]
    assert generation.token_logprobs == [-0.1, -1.0]
    assert generation.top_logprobs == [{"yes": -0.1, "no": -2.5}, {}]


def test_top_logprobs_with_the_same_text_are_summed_not_overwritten():
    """A real vLLM answer with top_logprobs 10 had alternatives that decode to the same
    text (byte fragments of one character each decode to U+FFFD; '' twice): kept in a
    dict by text, the later overwrote the earlier and 10 alternatives became 7."""
    top = [("Yes", 0.40), ("\ufffd", 0.10), ("No", 0.20), ("Yes", 0.15), ("\ufffd", 0.05),
           ("", 0.02), ("No", 0.03), ("", 0.01), ("\ufffd", 0.02), ("maybe", 0.01)]
    entries = [{"token": "Yes", "logprob": math.log(0.40),
                "top_logprobs": [{"token": t, "logprob": math.log(p),
                                  "bytes": [0xE4] if t == "\ufffd" else list(t.encode())}
                                 for t, p in top]}]
    generation = read_generation(answer("Yes", logprobs={"content": entries}), (8, 8))
    (alternatives,) = generation.top_logprobs
    assert set(alternatives) == {"Yes", "\ufffd", "No", "", "maybe"}
    expected = {"Yes": 0.55, "\ufffd": 0.17, "No": 0.23, "": 0.03, "maybe": 0.01}
    for text, p in expected.items():
        assert math.exp(alternatives[text]) == pytest.approx(p, rel=1e-12), text
    # nothing lost: the probabilities of the 10 alternatives still add up
    assert sum(math.exp(v) for v in alternatives.values()) == pytest.approx(0.99, rel=1e-12)


@pytest.mark.parametrize(("text", "match"), [
    (answer(None), "no text content"),
    (json.dumps({"id": "x"}), "no choices in the answer"),
])
def test_an_answer_without_text_is_a_final_error(text, match):
    with pytest.raises(RemoteError, match=match) as caught:
        read_generation(text, (8, 8))
    assert not caught.value.retryable


@pytest.mark.parametrize("text", ["<html>Bad gateway</html>", "", '{"id": "x", "choi'])
def test_a_body_that_is_not_json_is_worth_a_retry(text):
    """A proxy's error page or a cut connection under HTTP 200 passes like a 5xx."""
    with pytest.raises(RemoteError, match="not JSON") as caught:
        read_generation(text, (8, 8))
    assert caught.value.retryable and not caught.value.connection
    assert caught.value.status is None


def test_a_qianfan_error_under_http_200_is_read_and_retried_only_when_busy():
    limited = json.dumps({"id": "as-1", "error_code": 18,
                          "error_msg": "Open api qps request limit reached"})
    invalid = json.dumps({"id": "as-2", "error_code": 336003,
                          "error_msg": "the image is invalid"})
    assert provider_message(limited) == "Open api qps request limit reached (error_code 18)"
    with pytest.raises(RemoteError, match=r"qps request limit reached \(error_code 18\)") as busy:
        read_generation(limited, (8, 8))
    assert busy.value.retryable
    with pytest.raises(RemoteError, match="the image is invalid") as bad:
        read_generation(invalid, (8, 8))
    assert not bad.value.retryable


@pytest.mark.parametrize(("body", "message"), [
    ({"error": {"message": "Invalid model", "type": "invalid_request_error"}},
     "Invalid model (invalid_request_error)"),
    ({"error": {"message": "bad code 42", "code": 42}}, "bad code 42"),
    ({"code": "InvalidParameter", "message": "url error", "request_id": "r"},
     "url error (InvalidParameter)"),
    ({"object": "error", "message": "too long", "code": 0}, "too long"),
    ({"detail": "Not Found"}, "Not Found"),
    ({"error_code": 0, "result": "fine"}, None),
    (b"not json", None),
    ([1, 2], None),
])
def test_provider_message_reads_each_provider(body, message):
    raw = body if isinstance(body, bytes) else json.dumps(body)
    assert provider_message(raw) == message


# -- retries ---------------------------------------------------------------------------


def test_retry_after_in_seconds():
    assert retry_after(429, {"retry-after": "7"}) == 7.0
    assert retry_after(503, {"retry-after": "0.5"}) == 0.5
    assert retry_after(429, {"retry-after": "-3"}) == 0.0


def test_retry_after_as_an_http_date():
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after(503, {"retry-after": later}) <= 31
    earlier = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after(429, {"retry-after": earlier}) == 0.0


@pytest.mark.parametrize(("status", "headers"), [
    (500, {"retry-after": "7"}),  # only 429 and 503 ask for a wait
    (429, {}),
    (429, None),
    (429, {"retry-after": "soon"}),
])
def test_no_retry_after_to_honour(status, headers):
    assert retry_after(status, headers) is None


def test_backoff_doubles_with_jitter_up_to_the_cap():
    policy = RetryPolicy(max_retries=10, backoff=0.5, max_backoff=3.0)
    for attempt, full in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        waits = [policy.delay(attempt) for _ in range(50)]
        assert all(full / 2 <= w <= full for w in waits), (attempt, waits)
        assert len(set(waits)) > 1  # jittered


def test_the_server_wait_is_honoured_up_to_max_retry_after():
    policy = RetryPolicy(max_retries=3, backoff=10.0, max_backoff=10.0)
    assert policy.delay(0, asked=0.0) == 0.0
    assert policy.delay(1, asked=2.5) == 2.5
    assert policy.delay(2, asked=3600.0) == MAX_RETRY_AFTER


def test_a_failed_connection_gets_few_quick_retries():
    policy = RetryPolicy(max_retries=5, backoff=0.5, max_backoff=30.0)
    waits = [policy.delay(a, connection=True) for a in range(6)]
    assert waits[CONNECT_RETRIES:] == [None] * (6 - CONNECT_RETRIES)
    assert all(w is not None and w <= 0.1 * 2**a for a, w in enumerate(waits[:CONNECT_RETRIES]))
    assert RetryPolicy(max_retries=1, backoff=0.5, max_backoff=30.0).delay(
        1, connection=True) is None
    assert RetryPolicy(max_retries=0, backoff=0.5, max_backoff=30.0).delay(
        0, connection=True) is None


def test_no_wait_once_retries_are_spent():
    policy = RetryPolicy(max_retries=2, backoff=0.1, max_backoff=1.0)
    assert policy.delay(1) is not None
    assert policy.delay(2) is None and policy.delay(2, asked=1.0) is None
    assert RetryPolicy(max_retries=0, backoff=0.1, max_backoff=1.0).delay(0) is None


@pytest.mark.parametrize(("status", "retryable", "words"), [
    (400, False, "HTTP 400: bad request"),
    (401, False, "authentication failed"),
    (408, True, "HTTP 408: request failed"),
    (429, True, "rate limited"),
    (502, True, "HTTP 502: server error"),
])
def test_a_status_is_described_and_judged(status, retryable, words):
    assert retryable_status(status) is retryable
    assert words in describe_status(status)
    assert describe_status(status, "quota").endswith(": quota")


# -- order -----------------------------------------------------------------------------


def test_the_gate_admits_in_ticket_order_whatever_order_holders_come_in():
    async def main() -> list[int]:
        gate, order = OrderedGate(1), []
        tickets = [gate.ticket() for _ in range(4)]

        async def hold(ticket: int, delay: float) -> None:
            await asyncio.sleep(delay)
            async with gate.slot(ticket):
                order.append(ticket)
                await asyncio.sleep(0)

        gate.skip(tickets[2])  # failed before it was sent
        holders = asyncio.gather(hold(tickets[3], 0.0), hold(tickets[1], 0.01),
                                 hold(tickets[0], 0.02))
        await asyncio.wait_for(holders, 5)  # a gate that never opens fails, not hangs
        return order

    assert asyncio.run(main()) == [0, 1, 3]


# -- what a failure without an answer says -----------------------------------------------


def chained(*exceptions: BaseException) -> BaseException:
    """exceptions[0] raised from exceptions[1] raised from ... (as the SDK chains them)."""
    for outer, inner in itertools.pairwise(exceptions):
        outer.__cause__ = inner
    return exceptions[0]


class ConnectTimeout(Exception):
    """Stands for httpx2.ConnectTimeout: judged by name, whichever httpx is installed."""


class ConnectError(Exception):
    pass


def test_origin():
    assert origin("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert origin("https://api.example.com/v1") == "https://api.example.com:443"
    assert origin("http://gpu-box/v1") == "http://gpu-box:80"


def test_a_refused_connection_is_named_from_the_cause_chain():
    """The SDK over aiohttp says "Request timed out." for a refused connection; the
    cause chain says what happened."""
    import aiohttp
    import openai

    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    exc = chained(openai.APITimeoutError(request=None),
                  ConnectTimeout("Cannot connect to host 127.0.0.1:9 ssl:default"),
                  aiohttp.ClientConnectorError(None, refused), refused)
    message, connection = transport_failure(exc, "http://127.0.0.1:9/v1", 120.0)
    assert message == "cannot connect to http://127.0.0.1:9: connection refused"
    assert connection
    # over httpx: APIConnectionError from ConnectError from OSError from the refusal
    exc = chained(openai.APIConnectionError(request=None), ConnectError("All attempts failed"),
                  OSError("All connection attempts failed"), refused)
    assert transport_failure(exc, "http://127.0.0.1:9/v1") == (
        "cannot connect to http://127.0.0.1:9: connection refused", True)


def test_an_unknown_host_is_a_connection_failure():
    import aiohttp
    import openai

    gai = socket.gaierror(-2, "Name or service not known")
    exc = chained(openai.APITimeoutError(request=None), ConnectTimeout("Cannot connect"),
                  aiohttp.ClientConnectorDNSError(None, gai), gai)
    message, connection = transport_failure(exc, "http://gpu-box.invalid:8000/v1")
    assert connection
    assert message == ("cannot connect to http://gpu-box.invalid:8000: host not found "
                       "(Name or service not known)")


def test_a_dropped_connection_or_a_slow_answer_is_not_a_connection_failure():
    import aiohttp
    import openai

    dropped = chained(openai.APITimeoutError(request=None), ConnectTimeout("Server disconnected"),
                      aiohttp.ServerDisconnectedError("Server disconnected"))
    message, connection = transport_failure(dropped, "http://127.0.0.1:9/v1")
    assert not connection and message.startswith("connection to http://127.0.0.1:9 dropped")
    slow = chained(openai.APITimeoutError(request=None),
                   aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
    message, connection = transport_failure(slow, "http://127.0.0.1:9/v1", 2.5)
    assert not connection
    assert message == "no answer from http://127.0.0.1:9 after 2.5 s (timed out)"


def test_credentials_are_every_auth_like_header_value_and_the_key():
    headers = {"Authorization": "Bearer sk-abc123456", "x-api-key": "seg-0987654321",
               "Api-Key": "azure-key-1", "X-Custom-Token": "tok-5555", "X-Client-Secret": "shh!",
               "X-Auth-Mode": "on", "X-Trace": "trace-id-not-secret", "Accept": "text/plain"}
    found = credentials(headers, key="env-key-42")
    assert set(found) == {"Bearer sk-abc123456", "sk-abc123456", "seg-0987654321",
                          "azure-key-1", "tok-5555", "shh!", "env-key-42"}
    assert found == sorted(found, key=len, reverse=True)  # longest first
    assert credentials({}, None) == [] and credentials(None, "k") == ["k"]
