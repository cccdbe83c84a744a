"""OpenAIBackend against grounding.testing.loopback.LoopbackServer: exact coordinates for every
dialect, the image the server receives, retries and error records, concurrency, API-key
handling and the request options. Everything runs on 127.0.0.1, no network, no model."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grounding import GroundingError, load_image
from grounding.backends.base import Generation, Request
from grounding.backends.remote.client import OpenAIBackend, RemoteError
from grounding.pipeline.detector import Detector
from grounding.testing.loopback import (
    LoopbackServer,
    Reply,
    dashscope_error,
    dropped,
    garbage,
    grounding_handler,
    no_choices,
    openai_error,
    qianfan_error,
    rate_limited,
    red_box,
    scripted,
    segmind_no_credits,
    server_error,
    slow,
    token_logprob,
    tokenize,
)

GRAY = (128, 128, 128)
RED = (255, 0, 0)
PROMPT = "the red box"
DIALECTS = ("qwen2.5-vl", "qwen3-vl", "qwen2-vl", "qwen-vl", "deepseek-vl2")
RELATIVE = ("qwen3-vl", "qwen2-vl", "qwen-vl", "deepseek-vl2")
SMALL_BUDGET = 300_000
"""max_pixels for the coordinate tests: (900, 700) is over it, so the client downsizes."""
SIZES = [(240, 160), (23, 15), (900, 700), (517, 333)]
"""A plain image, a tiny one (upscaled to the dialect's minimum), one over the pixel budget
and one with odd sides."""


def rect_for(size: tuple[int, int], shift: int = 0) -> tuple[int, int, int, int]:
    """An off-centre rectangle covering about a third of each side (at least 2 px)."""
    w, h = size
    x0 = max(1, round(w * 0.21)) + shift
    y0 = max(1, round(h * 0.27))
    return x0, y0, min(w - 1, x0 + max(2, round(w * 0.4))), min(h - 1, y0 + max(2, round(h * 0.35)))


def scene(size: tuple[int, int], rect: tuple[int, int, int, int]) -> Image.Image:
    a = np.empty((size[1], size[0], 3), np.uint8)
    a[:] = GRAY
    x0, y0, x1, y1 = rect
    a[y0:y1, x0:x1] = RED
    return Image.fromarray(a)


def backend_for(server: LoopbackServer, dialect: str = "qwen2.5-vl", **options) -> OpenAIBackend:
    # PNG: the exactness tests compare to half a pixel, finer than JPEG's edge blur. The
    # default (JPEG) is tested on its own, with a pixel more of tolerance.
    options.setdefault("image_format", "png")
    options.setdefault("backoff", 0.01)
    options.setdefault("max_backoff", 0.05)
    options.setdefault("timeout", 10.0)
    return OpenAIBackend("loopback-model", base_url=server.base_url, dialect=dialect,
                         **options)


def tolerance(backend: OpenAIBackend, size: tuple[int, int],
              server_frame: tuple[int, int] | None = None) -> tuple[float, float]:
    """Half a model pixel in original pixels (plus half a server pixel when the server
    resizes again), per axis; a hair more for float rounding."""
    fw, fh = backend.frame(size)
    tx, ty = 0.5 * size[0] / fw, 0.5 * size[1] / fh
    if server_frame is not None:
        tx += 0.5 * size[0] / server_frame[0]
        ty += 0.5 * size[1] / server_frame[1]
    return tx + 1e-6 * size[0], ty + 1e-6 * size[1]


def assert_box_near(bbox, rect, tol: tuple[float, float]) -> None:
    tx, ty = tol
    errors = [abs(bbox[0] - rect[0]), abs(bbox[1] - rect[1]),
              abs(bbox[2] - rect[2]), abs(bbox[3] - rect[3])]
    limits = [tx, ty, tx, ty]
    assert all(e <= t for e, t in zip(errors, limits, strict=True)), (bbox, rect, errors, limits)


def only_box(result):
    assert result.error is None, result.error
    assert len(result.boxes) == 1, result.raw
    return result.boxes[0].bbox


# ------------------------------------------------------------------------- coordinates


@pytest.mark.parametrize("dialect", DIALECTS)
def test_box_comes_back_exactly_for_every_dialect_and_size(dialect):
    images = [scene(s, rect_for(s)) for s in SIZES]
    with LoopbackServer(handler=grounding_handler(dialect)) as server:
        backend = backend_for(server, dialect, max_pixels=SMALL_BUDGET)
        results = list(Detector(backend).detect_many(images, prompt=PROMPT))
        received = [r.image().size for r in server.completions]
    assert len(results) == len(SIZES)
    assert sorted(received) == sorted(backend.frame(s) for s in SIZES)
    for size, result in zip(SIZES, results, strict=True):
        assert (result.width, result.height) == size
        assert tuple(result.input_size) == backend.frame(size)
        assert_box_near(only_box(result), rect_for(size), tolerance(backend, size))
    if dialect != "qwen-vl":  # the fixed 448x448 frame has no budget to exceed
        big = backend.frame((900, 700))
        assert big[0] * big[1] <= SMALL_BUDGET and big[0] < 900, big
    if dialect in ("qwen2.5-vl", "qwen3-vl", "qwen2-vl"):
        tiny = backend.frame((23, 15))
        assert tiny[0] > 23 and tiny[1] > 15, tiny


def test_default_budget_downsizes_a_large_image():
    size = (1400, 1000)  # 1.4 Mpx, over qwen2.5-vl's default budget of 1280 * 28 * 28 px
    rect = rect_for(size)
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = backend_for(server, "qwen2.5-vl")
        result = Detector(backend).detect(scene(size, rect), prompt=PROMPT)
        sent = server.completions[0].image().size
    frame = backend.frame(size)
    assert sent == frame and frame[0] * frame[1] <= 1280 * 28 * 28 and frame[0] < size[0]
    assert_box_near(only_box(result), rect, tolerance(backend, size))


@pytest.mark.parametrize("dialect", RELATIVE)
@pytest.mark.parametrize("server_frame", [(300, 200), (1111, 777)])
def test_relative_dialects_stay_exact_when_the_server_resizes_again(dialect, server_frame):
    size = (640, 480)
    rect = rect_for(size)
    with LoopbackServer(handler=grounding_handler(dialect, server_frame)) as server:
        backend = backend_for(server, dialect, max_pixels=SMALL_BUDGET)
        result = Detector(backend).detect(scene(size, rect), prompt=PROMPT)
    assert_box_near(only_box(result), rect, tolerance(backend, size, server_frame))


# The EXIF definition of the orientation tag: the pixels a camera stores so that a viewer
# applying orientation N shows the upright picture u (as tests/test_images.py builds them).
STORED = {
    3: lambda u: u[::-1, ::-1],
    6: lambda u: u[:, ::-1].transpose(1, 0, 2),
    8: lambda u: u[::-1, :].transpose(1, 0, 2),
}


def save_oriented(path: Path, upright: Image.Image, orientation: int, fmt: str) -> None:
    stored = np.ascontiguousarray(STORED[orientation](np.asarray(upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(stored).save(path, fmt, exif=exif.tobytes(), **kwargs)


@pytest.mark.parametrize("dialect", ["qwen2.5-vl", "qwen3-vl", "deepseek-vl2"])
def test_exif_rotated_jpegs_land_on_the_object_as_displayed(tmp_path, dialect):
    size = (360, 200)  # displayed (upright) size
    rect = (40, 30, 170, 120)
    upright = scene(size, rect)
    paths = []
    for orientation in (3, 6, 8):
        path = tmp_path / f"o{orientation}.jpg"
        save_oriented(path, upright, orientation, "JPEG")
        with Image.open(path) as raw:
            assert raw.size == (size if orientation == 3 else size[::-1])
        paths.append(path)
    with LoopbackServer(handler=grounding_handler(dialect)) as server:
        backend = backend_for(server, dialect, max_pixels=SMALL_BUDGET)
        results = list(Detector(backend).detect_many(paths, prompt=PROMPT))
    tx, ty = tolerance(backend, size)
    for path, result in zip(paths, results, strict=True):
        assert result.image == str(path)
        assert (result.width, result.height) == size
        # JPEG blurs the red edge by up to about a pixel (chroma subsampling).
        assert_box_near(only_box(result), rect, (tx + 1.0, ty + 1.0))


# ----------------------------------------------------------------- what the server gets


@pytest.mark.parametrize("dialect,size,frame", [
    # upscaled to the budget's minimum (200,704 px): smart_resize, sides multiples of 28
    ("qwen2.5-vl", (333, 250), (532, 392)),
    # downscaled under max_pixels (300,000): sides multiples of 32
    ("qwen3-vl", (900, 700), (608, 480)),
    # Qwen-VL's visual encoder takes 448 x 448 whatever the image (its 0-1000 coordinates
    # are relative to that frame): the server gets exactly that
    ("qwen-vl", (200, 300), (448, 448)),
    ("deepseek-vl2", (120, 90), (120, 90)),  # tiles itself: sent as it is
])
def test_server_receives_the_model_frame_pixel_for_pixel(tmp_path, dialect, size, frame):
    path = tmp_path / "rotated.png"
    save_oriented(path, scene(size, rect_for(size)), 6, "PNG")  # EXIF on disk, upright in RAM
    upright = load_image(path)
    assert upright.size == size
    with LoopbackServer(handler=grounding_handler(dialect)) as server:
        backend = backend_for(server, dialect, max_pixels=SMALL_BUDGET)
        result = Detector(backend).detect(path, prompt=PROMPT)
        (request,) = server.completions
    assert backend.frame(size) == frame
    assert tuple(result.input_size) == frame  # the frame the coordinates refer to
    assert (result.width, result.height) == size
    ((media_type, _),) = request.image_bytes()
    assert media_type == "image/png"
    got = request.image()
    assert got.format == "PNG" and got.size == frame
    expected = upright if frame == size else upright.resize(frame, Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))
    # The request is a plain OpenAI chat request: image part, then the prompt.
    (message,) = request.json["messages"]
    assert message["role"] == "user"
    assert [p["type"] for p in message["content"]] == ["image_url", "text"]
    assert PROMPT in request.text


def test_by_default_a_jpeg_of_the_frame_is_sent():
    size = (400, 300)
    rect = rect_for(size)
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = OpenAIBackend("loopback-model", base_url=server.base_url,
                                dialect="qwen2.5-vl")
        result = Detector(backend).detect(scene(size, rect), prompt=PROMPT)
        (request,) = server.completions
    ((media_type, _),) = request.image_bytes()
    assert media_type == "image/jpeg"
    got, frame = request.image(), backend.frame(size)
    assert got.size == frame
    expected = scene(size, rect).resize(frame, Image.Resampling.BICUBIC)
    error = np.abs(np.asarray(got, np.float32) - np.asarray(expected, np.float32))
    assert error.mean() < 1.0  # quality 95: the frame's pixels, give or take rounding
    assert_box_near(only_box(result), rect, tuple(t + 1.0 for t in tolerance(backend, size)))


# ----------------------------------------------------------------- reference images


@pytest.mark.parametrize("dialect", ["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("text_first", [False, True], ids=["images-first", "text-first"])
def test_references_go_before_the_image_and_boxes_come_from_the_last(dialect, text_first):
    # The reference has its own size and its red box elsewhere: a box read from it, or
    # mapped through its frame, would miss the target's rectangle.
    ref_size, size = (200, 140), (400, 300)
    reference = scene(ref_size, (120, 80, 190, 130))
    rect = rect_for(size)
    with LoopbackServer(handler=grounding_handler(dialect)) as server:
        backend = backend_for(server, dialect, max_pixels=SMALL_BUDGET, text_first=text_first)
        result = Detector(backend).detect(scene(size, rect), prompt=PROMPT,
                                          references=[reference])
        (request,) = server.completions
    assert_box_near(only_box(result), rect, tolerance(backend, size))
    assert tuple(result.input_size) == backend.frame(size)
    sent = request.images()
    assert [im.size for im in sent] == [backend.frame(ref_size), backend.frame(size)]
    assert red_box(sent[0]) != red_box(sent[1])
    (message,) = request.json["messages"]
    kinds = [p["type"] for p in message["content"]]
    assert kinds == (["text", "image_url", "image_url"] if text_first
                     else ["image_url", "image_url", "text"])
    assert "The first image is an example" in request.text and PROMPT in request.text


def test_references_are_encoded_once_per_run(monkeypatch):
    import grounding.backends.remote.codec as remote

    calls = []
    encode = remote._encode

    def counting(image, frame, image_format):
        calls.append(image.size)
        return encode(image, frame, image_format)

    monkeypatch.setattr(remote, "_encode", counting)
    refs = [scene((90, 70), (10, 10, 40, 40)), scene((100, 60), (50, 20, 90, 50))]
    targets = [scene((160, 120), rect_for((160, 120), k)) for k in range(5)]
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = backend_for(server, concurrency=2)
        results = list(Detector(backend).detect_many(targets, prompt=PROMPT, references=refs))
        counts = {len(r.image_urls()) for r in server.completions}
    assert all(r.error is None for r in results)
    assert counts == {3}
    assert sorted(calls) == sorted([(90, 70), (100, 60)] + [(160, 120)] * 5)


def test_a_bad_reference_fails_before_any_request(tmp_path):
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = backend_for(server)
        with pytest.raises(GroundingError, match=r"missing\.png"):
            Detector(backend).detect(one_image(), prompt=PROMPT,
                                     references=[tmp_path / "missing.png"])
        assert server.calls == 0


def test_cli_detect_with_a_reference_and_text_first(tmp_path):
    import json

    from typer.testing import CliRunner

    from grounding.cli.app import app

    size, rect = (300, 200), rect_for((300, 200))
    scene(size, rect).save(tmp_path / "target.png")
    scene((120, 90), (5, 5, 40, 30)).save(tmp_path / "example.png")
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        common = ["--prompt", PROMPT, "--backend", "openai", "--base-url", server.base_url,
                  "--model", "m", "--dialect", "qwen2.5-vl"]
        out = CliRunner().invoke(app, ["detect", str(tmp_path / "target.png"), "--reference",
                                       str(tmp_path / "example.png"), "--text-first", *common])
        bad = CliRunner().invoke(app, ["detect", str(tmp_path / "target.png"), "--reference",
                                       str(tmp_path / "nope.png"), *common])
        (request,) = server.completions
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert_box_near(record["detections"][0]["bbox"], rect, (1.5, 1.5))
    kinds = [p["type"] for p in request.json["messages"][0]["content"]]
    assert kinds == ["text", "image_url", "image_url"]
    assert bad.exit_code == 2 and "error: reference image" in bad.stderr
    assert "nope.png" in bad.stderr and bad.stderr.count("\n") == 1


def test_system_prompt_is_sent_as_a_system_message():
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = backend_for(server)
        Detector(backend).detect(scene((64, 64), rect_for((64, 64))), prompt=PROMPT,
                                 system="You are a careful annotator.")
        body = server.completions[0].json
    assert body["messages"][0]["role"] == "system"
    assert "careful annotator" in str(body["messages"][0]["content"])
    assert body["messages"][-1]["role"] == "user"
    assert body["model"] == "loopback-model"


# ------------------------------------------------------------------------------ retries


def good():
    return grounding_handler("qwen2.5-vl")


def one_image(shift: int = 0) -> Image.Image:
    size = (96, 64)
    return scene(size, rect_for(size, shift))


def run_one(server: LoopbackServer, **options):
    backend = backend_for(server, **options)
    started = time.perf_counter()
    (result,) = Detector(backend).detect_many([one_image()], prompt=PROMPT)
    return result, time.perf_counter() - started


def test_429_retry_after_is_honoured_then_success():
    with LoopbackServer(handler=scripted([rate_limited(retry_after=0.4)], good())) as server:
        result, elapsed = run_one(server, backoff=0.01)
        assert server.calls == 2
        gap = server.completions[1].received_at - server.completions[0].received_at
    only_box(result)
    # The backoff alone would wait about 0.01 s: the 0.4 s came from Retry-After.
    assert gap >= 0.4 and elapsed >= 0.4, (gap, elapsed)
    assert elapsed < 3.0


def test_429_without_retry_after_backs_off_and_succeeds():
    with LoopbackServer(handler=scripted([rate_limited(None)] * 2, good())) as server:
        result, _ = run_one(server)
        assert server.calls == 3
    only_box(result)


@pytest.mark.parametrize("fault", [
    [server_error(503)],
    [server_error(500)],
    [server_error(503), server_error(500), server_error(502)],
    [dropped()],
    [dropped(), server_error(503)],
], ids=["503", "500", "503-500-502", "drop", "drop-503"])
def test_transient_failures_are_retried(fault):
    with LoopbackServer(handler=scripted(fault, good())) as server:
        result, _ = run_one(server)
        assert server.calls == len(fault) + 1
    only_box(result)


def test_timeout_is_retried():
    with LoopbackServer(handler=scripted([slow(5.0)], good())) as server:
        result, elapsed = run_one(server, timeout=0.5)
        assert server.calls == 2
    only_box(result)
    assert 0.5 <= elapsed < 4.0, elapsed


@pytest.mark.parametrize("fault,status,text", [
    (openai_error(400, "Invalid image: unsupported dimensions"), 400, "unsupported dimensions"),
    (openai_error(401, "Incorrect API key provided", "invalid_request_error",
                  "invalid_api_key"), 401, "Incorrect API key provided"),
    (openai_error(404, "The model `nope` does not exist", "invalid_request_error",
                  "model_not_found"), 404, "does not exist"),
], ids=["400", "401", "404"])
def test_client_errors_are_not_retried(fault, status, text):
    with LoopbackServer(handler=scripted([fault], good())) as server:
        result, _ = run_one(server, max_retries=5)
        assert server.calls == 1
    assert result.boxes == [] and result.error
    assert "RemoteError" in result.error and str(status) in result.error
    assert text in result.error
    assert result.width == 96 and result.height == 64


def test_after_max_retries_the_image_gets_an_error_record():
    always = scripted([], lambda r: server_error(503, "overloaded, try later"))
    with LoopbackServer(handler=always) as server:
        result, _ = run_one(server, max_retries=2)
        assert server.calls == 3
    assert result.error and "503" in result.error and "overloaded, try later" in result.error
    record = result.to_record()
    assert record["error"] == result.error and record["detections"] == []


def free_port() -> int:
    """A port where nothing listens (the server that had it has stopped)."""
    with LoopbackServer() as server:
        return server.port


def test_connection_refused_is_reported_as_such_at_once():
    """Nothing listens at the port: the SDK over aiohttp raises "Request timed out." within
    milliseconds; the error says what happened, is marked ``connection`` and comes after
    a few quick retries, not the full backoff (about 15 s with the defaults)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    backend = OpenAIBackend("m", base_url=url, dialect="qwen2.5-vl")  # default retries
    started = time.perf_counter()
    (error,) = backend.generate([Request(one_image(), "p")])
    elapsed = time.perf_counter() - started
    (result,) = Detector(backend).detect_many([one_image()], prompt=PROMPT)
    backend.close()
    assert elapsed < 3.0, elapsed
    assert isinstance(error, RemoteError)
    assert error.connection is True and error.retryable is True and error.status is None
    assert str(error).startswith(f"cannot connect to http://127.0.0.1:{port}: connection "
                                 "refused")
    assert "timed out" not in str(error)
    assert result.error and "RemoteError" in result.error
    assert f"cannot connect to http://127.0.0.1:{port}: connection refused" in result.error


def test_connection_refused_when_listing_models_is_a_connection_error():
    port = free_port()
    started = time.perf_counter()
    with pytest.raises(RemoteError, match="connection refused") as caught:
        OpenAIBackend(base_url=f"http://127.0.0.1:{port}/v1")
    assert time.perf_counter() - started < 3.0
    assert caught.value.connection and caught.value.status is None


def test_other_failures_are_not_connection_errors():
    """Only a connection that cannot be made is ``connection``: not an HTTP error, not a
    server that hangs up or answers too late."""
    cases = [(server_error(503), {}), (dropped(), {}), (slow(5.0), {"timeout": 0.3}),
             (openai_error(400, "bad"), {})]
    for fault, options in cases:
        with LoopbackServer(handler=scripted([], lambda r, f=fault: f)) as server:
            (error,) = backend_for(server, max_retries=1, **options).generate(
                [Request(one_image(), "p")])
        assert isinstance(error, RemoteError) and error.connection is False, (fault, error)
    assert "timed out" in str(error) or "400" in str(error)


@pytest.mark.parametrize("fault,text", [
    (qianfan_error(336003, "the image is invalid"), "the image is invalid"),
    (dashscope_error("InvalidParameter", "The image length and width do not meet the "
                     "model restrictions."), "do not meet the model restrictions"),
    (openai_error(400, "This model's maximum context length is 32768 tokens"),
     "maximum context length is 32768 tokens"),
    (segmind_no_credits(), "Not enough credits"),
], ids=["qianfan", "dashscope", "openai", "segmind-406"])
def test_provider_error_bodies_become_one_clear_message(fault, text):
    with LoopbackServer(handler=scripted([fault], good())) as server:
        result, _ = run_one(server)
        assert server.calls == 1
    assert result.error and text in result.error, result.error
    assert result.error.count(text) == 1  # said once, not repeated
    assert "\n" not in result.error


@pytest.mark.parametrize("fault", [no_choices(), Reply(200, {"choices": []}),
                                   Reply(200, [1, 2, 3])],
                         ids=["no-choices", "empty-choices", "list"])
def test_malformed_answers_are_error_records(fault):
    with LoopbackServer(handler=scripted([fault], good())) as server:
        result, _ = run_one(server)
        assert server.calls == 1  # an answer, just not one with text: not asked again
    assert result.error and "RemoteError" in result.error, result.error
    assert result.boxes == []


@pytest.mark.parametrize("fault", [garbage(), Reply(200, b""),
                                   Reply(200, b'{"id": "chatcmpl-1", "choi')],
                         ids=["html", "empty-body", "cut"])
def test_a_200_answer_that_is_not_json_is_retried_like_a_5xx(fault):
    """A proxy's HTML page or a cut connection under HTTP 200 is no answer at all."""
    with LoopbackServer(handler=scripted([fault, fault], good())) as server:
        result, _ = run_one(server)
        assert server.calls == 3
    only_box(result)


def test_a_200_answer_that_is_never_json_becomes_an_error_record():
    with LoopbackServer(handler=scripted([], lambda r: garbage())) as server:
        backend = backend_for(server, max_retries=2)
        (error,) = backend.generate([Request(one_image(), "p")])
        result, _ = run_one(server, max_retries=2)
        assert server.calls == 6
    assert isinstance(error, RemoteError) and error.retryable and not error.connection
    assert "not JSON" in str(error) and "502 Bad Gateway" in str(error)
    assert "gave up after 3 attempts" in str(error)
    assert result.error and "not JSON" in result.error and result.boxes == []


def test_a_failing_image_does_not_sink_the_others():
    sizes = [(96, 64), (80, 80), (120, 70), (64, 100), (100, 50)]
    images = [scene(s, rect_for(s)) for s in sizes]
    bad = {1: openai_error(400, "image rejected by policy"), 3: garbage()}
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = backend_for(server, concurrency=3)
        frames = {backend.frame(sizes[i]): reply for i, reply in bad.items()}
        assert len(frames) == len(bad)  # each bad image is known by its frame size
        ok = server.handler

        def handler(request):
            reply = frames.get(request.image().size)
            return reply if reply is not None else ok(request)

        server.handler = handler
        results = list(Detector(backend).detect_many(images, prompt=PROMPT))
    assert [r.error is not None for r in results] == [False, True, False, True, False]
    assert "image rejected by policy" in results[1].error
    for i in (0, 2, 4):
        assert_box_near(only_box(results[i]), rect_for(sizes[i]), tolerance(backend, sizes[i]))


def test_generate_returns_errors_in_place_and_never_raises():
    with LoopbackServer(handler=scripted([openai_error(400, "bad one")], good())) as server:
        backend = backend_for(server, concurrency=1)
        out = backend.generate([Request(one_image(), "p"), Request(one_image(3), "p")])
    assert isinstance(out[0], RemoteError) and out[0].status == 400
    assert isinstance(out[0], GroundingError)
    assert isinstance(out[1], Generation)


# -------------------------------------------------------------------------- concurrency


def test_concurrency_is_exactly_the_limit_and_order_is_kept():
    sizes = [(60 + 4 * i, 50 + 3 * (i % 5)) for i in range(20)]
    rects = [rect_for(s, shift=i % 7) for i, s in enumerate(sizes)]
    images = [scene(s, r) for s, r in zip(sizes, rects, strict=True)]
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl"), latency=0.1) as server:
        backend = backend_for(server, concurrency=4)
        started = time.perf_counter()
        results = list(Detector(backend).detect_many(images, prompt=PROMPT))
        elapsed = time.perf_counter() - started
        assert server.calls == 20
        assert server.max_in_flight == 4
    for size, rect, result in zip(sizes, rects, results, strict=True):
        assert (result.width, result.height) == size
        assert_box_near(only_box(result), rect, tolerance(backend, size))
    assert elapsed >= 0.5  # 20 requests, 4 at a time, 0.1 s each
    assert elapsed < 2.0, elapsed


def test_agenerate_keeps_input_order():
    import asyncio

    sizes = [(50 + 7 * i, 40 + 5 * i) for i in range(6)]
    requests = [Request(scene(s, rect_for(s)), "p") for s in sizes]
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = backend_for(server, concurrency=6)
        out = asyncio.run(backend.agenerate(requests))
    assert [g.input_size for g in out] == [backend.frame(s) for s in sizes]


# ------------------------------------------------------------------------------ API key

SECRET = "sk-loopback-TOP-SECRET-0123456789"


def leaky_401(request):
    """A server that echoes the credential it got, as some gateways do."""
    got = request.headers.get("authorization") or request.headers.get("x-api-key")
    return openai_error(401, f"Incorrect API key provided: {got}", "invalid_request_error",
                        "invalid_api_key")


def assert_no_secret(results, errors, caplog) -> None:
    for r in results:
        assert SECRET not in r.to_json()
        assert SECRET not in repr(r)
        if r.error:
            assert SECRET not in r.error
    for e in errors:
        if not isinstance(e, BaseException):
            continue
        assert SECRET not in str(e) and SECRET not in repr(e)
        assert SECRET not in repr(e.args)
    for record in caplog.records:
        assert SECRET not in record.getMessage(), record.name
        assert SECRET not in str(record.args)


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
def test_api_key_is_sent_and_never_leaks(monkeypatch, caplog, header):
    caplog.set_level(logging.DEBUG)
    for name in ("grounding", "openai", "httpx2", "httpcore2", "httpx", "httpcore", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setenv("LOOPBACK_TEST_KEY", SECRET)
    handler = scripted([server_error(503), leaky_401], good(), key=lambda r: r.image().size)
    sizes = [(96, 64), (80, 80)]
    images = [scene(s, rect_for(s)) for s in sizes]
    with LoopbackServer(handler=handler) as server:
        backend = backend_for(server, api_key_env="LOOPBACK_TEST_KEY", api_key_header=header,
                              concurrency=1)
        results = list(Detector(backend).detect_many(images, prompt=PROMPT))
        raw = backend.generate([Request(images[0], "p")])  # third call for this size: good
        seen = [r.headers for r in server.completions]
    if header == "Authorization":
        assert all(h.get("authorization") == f"Bearer {SECRET}" for h in seen)
        assert all("x-api-key" not in h for h in seen)
    else:
        assert all(h.get("x-api-key") == SECRET for h in seen)
        assert all(SECRET not in h.get("authorization", "") for h in seen)
    # 503 retried, then a 401 that echoes the key: error records, key scrubbed.
    assert all(r.error and "401" in r.error for r in results)
    assert "Incorrect API key provided" in results[0].error
    assert isinstance(raw[0], Generation)
    assert any("retry" in r.getMessage().lower() for r in caplog.records)  # logs were seen
    assert_no_secret(results, raw, caplog)


def test_api_key_does_not_leak_from_exhausted_retries(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LOOPBACK_TEST_KEY", SECRET)

    def echo_503(request):
        return server_error(503, f"upstream rejected {request.headers.get('authorization')}")

    with LoopbackServer(handler=echo_503) as server:
        backend = backend_for(server, api_key_env="LOOPBACK_TEST_KEY", max_retries=1)
        out = backend.generate([Request(one_image(), "p")])
        (result,) = Detector(backend).detect_many([one_image()], prompt=PROMPT)
    assert isinstance(out[0], RemoteError) and out[0].status == 503
    assert result.error and "upstream rejected" in result.error
    assert_no_secret([result], out, caplog)


@pytest.mark.parametrize("headers", [
    {"x-api-key": SECRET},
    {"Authorization": f"Bearer {SECRET}"},
    {"X-Goog-Api-Key": SECRET},
    {"X-Custom-Token": SECRET, "X-Trace": "abc"},
], ids=["x-api-key", "authorization", "name-with-key", "name-with-token"])
def test_a_key_given_as_a_header_never_leaks(caplog, headers):
    """--header "x-api-key: ..." is sent as it is and scrubbed like --api-key-env's key."""
    caplog.set_level(logging.DEBUG)

    def echo(request):
        seen = ", ".join(f"{k}={v}" for k, v in request.headers.items())
        if request.index % 2 == 0:
            return server_error(503, f"upstream saw {seen}")
        return openai_error(401, f"Incorrect API key provided: {seen}")

    with LoopbackServer(handler=echo) as server:
        backend = backend_for(server, headers=headers, max_retries=1, concurrency=1)
        out = backend.generate([Request(one_image(), "p")])
        (result,) = Detector(backend).detect_many([one_image()], prompt=PROMPT)
        sent = server.completions[0].headers
    for name, value in headers.items():
        assert sent[name.lower()] == value  # sent unchanged
    assert isinstance(out[0], RemoteError) and "Incorrect API key provided" in str(out[0])
    assert "***" in str(out[0]) and "***" in result.error
    assert any("***" in r.getMessage() for r in caplog.records)  # the 503 retry's line
    assert_no_secret([result], out, caplog)


def test_missing_api_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LOOPBACK_NO_SUCH_KEY", raising=False)
    with LoopbackServer() as server, pytest.raises(GroundingError, match="LOOPBACK_NO_SUCH_KEY"):
        backend_for(server, api_key_env="LOOPBACK_NO_SUCH_KEY")


def test_segmind_style_path_and_header(monkeypatch):
    monkeypatch.setenv("LOOPBACK_TEST_KEY", SECRET)
    path = "/v1/qwen2-vl-7b-instruct"
    with LoopbackServer(handler=grounding_handler("qwen2-vl"), path=path) as server:
        backend = backend_for(server, "qwen2-vl", endpoint="/qwen2-vl-7b-instruct",
                              api_key_env="LOOPBACK_TEST_KEY", api_key_header="x-api-key")
        result = Detector(backend).detect(one_image(), prompt=PROMPT)
        (request,) = server.completions
    assert request.path == path and request.headers["x-api-key"] == SECRET
    assert_box_near(only_box(result), rect_for((96, 64)), tolerance(backend, (96, 64)))


# ------------------------------------------------------------------- request options


@pytest.mark.parametrize("reason,truncated", [("length", True), ("stop", False),
                                              ("normal", False), (None, False)])
def test_finish_reason(reason, truncated):
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", finish_reason=reason)) as server:
        result, _ = run_one(server)
    assert result.error is None
    assert result.truncated is truncated
    assert result.generation.truncated is truncated


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_token_param(param):
    with LoopbackServer(handler=good()) as server:
        run_one(server, token_param=param, max_new_tokens=321)
        body = server.completions[0].json
    other = {"max_tokens", "max_completion_tokens"} - {param}
    assert body[param] == 321
    assert not other & set(body)


def test_logprobs_fill_the_generation():
    with LoopbackServer(handler=good()) as server:
        result, _ = run_one(server, logprobs=True)
        body = server.completions[0].json
    assert body.get("logprobs") is True
    g = result.generation
    tokens = tokenize(result.raw)
    assert g.tokens == tokens and "".join(g.tokens) == result.raw
    assert g.token_logprobs == [token_logprob(i) for i in range(len(tokens))]


def test_server_without_logprobs_support_still_answers():
    def no_logprobs(request):
        if "logprobs" in request.json:
            return openai_error(400, "logprobs is not supported by this model")
        return good()(request)

    with LoopbackServer(handler=no_logprobs) as server:
        result, _ = run_one(server, logprobs=True)
        assert server.calls == 2
        assert "logprobs" not in server.completions[1].json
        assert "top_logprobs" not in server.completions[1].json
    only_box(result)
    assert result.generation.token_logprobs is None


def test_after_logprobs_are_refused_the_retry_is_one_vllm_accepts():
    """vLLM started with --max-logprobs 5 refuses top_logprobs 10; asked again without
    logprobs, the request must not keep top_logprobs: vLLM refuses that too ("when using
    `top_logprobs`, `logprobs` must be set to true"), and so does the loopback server."""
    with LoopbackServer(handler=good(), max_logprobs=5) as server:
        result, _ = run_one(server, logprobs=True)
        first, retry = server.completions
    assert first.json["logprobs"] is True and first.json["top_logprobs"] == 10
    assert "logprobs" not in retry.json and "top_logprobs" not in retry.json
    only_box(result)
    assert result.generation.token_logprobs is None


def test_empty_batch():
    with LoopbackServer() as server:
        assert backend_for(server).generate([]) == []
        assert server.calls == 0


def test_no_logprobs_when_not_asked():
    with LoopbackServer(handler=good()) as server:
        result, _ = run_one(server, logprobs=False)
        body = server.completions[0].json
    assert "logprobs" not in body or not body["logprobs"]
    assert result.generation.token_logprobs is None
    only_box(result)


def test_json_schema_sends_a_response_format():
    with LoopbackServer(handler=good()) as server:
        result, _ = run_one(server, json_schema=True)
        body = server.completions[0].json
    assert body["response_format"]["type"] == "json_schema"
    assert "schema" in body["response_format"]["json_schema"]
    only_box(result)
    with LoopbackServer(handler=good()) as server:
        run_one(server, json_schema=False)
        assert "response_format" not in server.completions[0].json


def test_extra_body_and_headers_are_sent():
    with LoopbackServer(handler=good()) as server:
        run_one(server, extra_body={"top_k": 1, "repetition_penalty": 1.05},
                headers={"X-Trace": "abc"})
        (request,) = server.completions
    assert request.json["top_k"] == 1 and request.json["repetition_penalty"] == 1.05
    assert request.headers["x-trace"] == "abc"


def test_model_none_takes_the_first_listed_model():
    models = ["first-served-model", "second-model"]
    with LoopbackServer(handler=good(), models=models) as server:
        backend = OpenAIBackend(None, base_url=server.base_url, dialect="qwen2.5-vl",
                                backoff=0.01)
        Detector(backend).detect(one_image(), prompt=PROMPT)
        assert [r.path for r in server.requests] == ["/v1/models", "/v1/chat/completions"]
        assert server.completions[0].json["model"] == "first-served-model"
    assert backend.model == "first-served-model"


def test_model_none_guesses_the_dialect_from_the_listed_name():
    with LoopbackServer(handler=grounding_handler("qwen3-vl"),
                        models=["Qwen/Qwen3-VL-8B-Instruct"]) as server:
        backend = OpenAIBackend(base_url=server.base_url, backoff=0.01)
        result = Detector(backend).detect(one_image(), prompt=PROMPT)
    assert backend.dialect.name == "qwen3-vl"
    assert_box_near(only_box(result), rect_for((96, 64)), tolerance(backend, (96, 64)))


# ------------------------------------------------------------------- the loopback itself


def test_loopback_red_box_and_lifetime():
    image = scene((50, 40), (5, 6, 20, 30))
    assert red_box(image) == (5, 6, 20, 30)
    assert red_box(Image.new("RGB", (8, 8), GRAY)) is None
    server = LoopbackServer(lifetime=0.2).start()
    thread = server._thread
    time.sleep(0.6)
    assert thread is not None and not thread.is_alive()
    server.stop()  # idempotent after the timer stopped it


def test_503_retry_after_is_honoured_and_capped(monkeypatch):
    import grounding.backends.remote.retry as remote

    monkeypatch.setattr(remote, "MAX_RETRY_AFTER", 0.3)
    busy = Reply(503, {"error": {"message": "busy"}}, headers={"Retry-After": "3600"})
    with LoopbackServer(handler=scripted([busy], good())) as server:
        result, elapsed = run_one(server, backoff=0.01)
        assert server.calls == 2
    only_box(result)
    assert 0.3 <= elapsed < 3.0  # waited, but not the hour the server asked for


def test_qianfan_rate_limit_under_http_200_is_retried():
    limited = qianfan_error(18, "Open api qps request limit reached")
    with LoopbackServer(handler=scripted([limited], good())) as server:
        result, _ = run_one(server)
        assert server.calls == 2
    only_box(result)


def test_backend_works_again_after_close():
    with LoopbackServer(handler=good()) as server:
        backend = backend_for(server)
        first = backend.generate([Request(one_image(), "p")])
        backend.close()
        second = backend.generate([Request(one_image(), "p")])
        backend.close()
    assert not isinstance(first[0], Exception) and not isinstance(second[0], Exception)
    assert first[0].text == second[0].text


def test_a_backend_dropped_without_close_leaves_no_open_session(caplog):
    """aiohttp complains about a session that is collected open; the backend closes its
    sessions itself when it is collected (Jupyter users rarely call close())."""
    import gc
    import warnings

    with LoopbackServer(handler=good()) as server:
        backend = backend_for(server)
        assert not isinstance(backend.generate([Request(one_image(), "p")])[0], Exception)
        thread = next(t for t in threading.enumerate() if t.name == "grounding-remote")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del backend
            gc.collect()
            thread.join(5)  # the private loop stops once its sessions are closed
        gc.collect()
    assert not thread.is_alive()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Unclosed" in m], messages


def test_aclose_closes_the_clients_of_the_running_loop():
    import asyncio

    async def use(server) -> list:
        backend = backend_for(server)
        out = await backend.agenerate([Request(one_image(), "p")])
        clients = list(backend._pools[asyncio.get_running_loop()].clients)
        await backend.aclose()
        return [out, clients]

    with LoopbackServer(handler=good()) as server:
        out, clients = asyncio.run(use(server))
    assert not isinstance(out[0], Exception)
    assert clients and all(c.is_closed() for c in clients)
