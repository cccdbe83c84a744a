"""The loopback server itself: it refuses the chat requests vLLM refuses (so a client
sending one fails here, not against a real server), and it runs from the command line
(``python -m grounding.testing.loopback``) for trying ``--backend openai`` offline."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from grounding.testing.loopback import LoopbackServer, chat_request_problem, fixed_handler

VALID = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
         "temperature": 0.0, "logprobs": True, "top_logprobs": 10}


def post(url: str, body, timeout: float = 10.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, timeout: float = 10.0) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.status, json.loads(answer.read())


# ------------------------------------------------------------------- vLLM's checks


@pytest.mark.parametrize(("change", "words"), [
    ({"logprobs": None}, "when using `top_logprobs`, `logprobs` must be set to true"),
    ({"logprobs": False}, "when using `top_logprobs`, `logprobs` must be set to true"),
    ({"top_logprobs": 21}, "greater than max allowed: 20"),
    ({"top_logprobs": -1}, "must be a positive value"),
    ({"top_logprobs": 2.5}, "valid integer"),
    ({"logprobs": "yes"}, "valid boolean"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"max_tokens": -5}, "max_tokens must be at least 1"),
    ({"max_completion_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"messages": None}, "messages: Field required"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"content": "no role"}]}, "needs a role"),
    ({"temperature": -0.5}, "temperature must be non-negative"),
    ({"n": 0}, "n must be at least 1"),
])
def test_what_vllm_refuses_is_named(change, words):
    body = {**VALID, **change}
    body = {k: v for k, v in body.items() if v is not None}
    problem = chat_request_problem(body)
    assert problem is not None and words in problem, problem


@pytest.mark.parametrize("change", [
    {}, {"logprobs": False, "top_logprobs": None}, {"top_logprobs": 0, "logprobs": None},
    {"top_logprobs": 20}, {"max_tokens": None, "max_completion_tokens": 1},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]},
    {"response_format": {"type": "json_schema"}, "top_k": 1},
])
def test_what_vllm_takes_passes(change):
    body = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    assert chat_request_problem(body) is None


def test_a_lower_max_logprobs_is_honoured():
    assert chat_request_problem(VALID, max_logprobs=5) == (
        "Requested sample logprobs of 10, which is greater than max allowed: 5")


def test_the_server_answers_a_refused_request_with_vllms_400_and_never_calls_the_handler():
    calls = []

    def handler(request):
        calls.append(request)
        return fixed_handler()(request)

    bad = {**VALID}
    del bad["logprobs"]
    with LoopbackServer(handler=handler) as server:
        url = f"{server.url}/v1/chat/completions"
        status, body = post(url, bad)
        assert (status, len(calls)) == (400, 0)
        assert body["error"]["type"] == "BadRequestError" and body["error"]["code"] == 400
        assert "`logprobs` must be set to true" in body["error"]["message"]
        assert post(url, b"not json")[0] == 400
        assert post(url, VALID)[0] == 200 and len(calls) == 1
    with LoopbackServer(handler=handler, validate=False) as server:
        assert post(f"{server.url}/v1/chat/completions", bad)[0] == 200
    assert len(calls) == 2


# ------------------------------------------------------------------- command line


def red_square_url() -> str:
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    image.paste((255, 0, 0), (20, 10, 80, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "grounding.testing.loopback", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stdout.readline()  # the first line names the base URL
    found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
    if not found:
        process.kill()
        raise AssertionError(f"no base URL in {line!r}; stderr: {process.communicate()[1]}")
    return process, found.group(1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_command_serves_until_a_signal(signum):
    process, base_url = start_cli("--dialect", "qwen2.5-vl", "--latency", "0.05")
    try:
        status, models = get(f"{base_url}/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["loopback-qwen2.5-vl"]
        body = {"model": "loopback-qwen2.5-vl", "max_tokens": 64, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": red_square_url()}}, {"type": "text", "text": "the red box"}]}]}
        started = time.perf_counter()
        status, answer = post(f"{base_url}/chat/completions", body)
        assert time.perf_counter() - started >= 0.05  # --latency
        assert status == 200
        text = answer["choices"][0]["message"]["content"]
        assert '"bbox_2d": [20, 10, 80, 60]' in text  # the red square, in image pixels
        process.send_signal(signum)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_the_command_works_with_the_cli_openai_backend(tmp_path):
    """The README's offline trial: the server's model name tells grounding the dialect."""
    from typer.testing import CliRunner

    from grounding.cli.app import app

    image = Image.new("RGB", (300, 200), (128, 128, 128))
    image.paste((255, 0, 0), (30, 40, 120, 150))
    image.save(tmp_path / "red.png")
    process, base_url = start_cli("--dialect", "qwen3-vl")
    try:
        out = CliRunner().invoke(app, ["detect", str(tmp_path / "red.png"), "--prompt",
                                       "the red box", "--backend", "openai",
                                       "--base-url", base_url])
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["dialect"] == "qwen3-vl" and record["model"] == "loopback-qwen3-vl"
    (detection,) = record["detections"]
    assert detection["bbox"] == pytest.approx([30, 40, 120, 150], abs=1.5)


def test_a_port_in_use_is_one_line_and_exit_1():
    with LoopbackServer() as server:
        result = subprocess.run(
            [sys.executable, "-m", "grounding.testing.loopback", "--port", str(server.port)],
            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("error: loopback server failed to start")
    assert "Traceback" not in result.stderr
