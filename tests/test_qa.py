"""Visual questions on detections (grounding.pipeline.qa, `grounding ask`): answers read into
attributes, the whole set asked with numbered boxes, record files, against a loopback
server and the tiny local model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding import GroundingError
from grounding.backends.local import LocalBackend
from grounding.backends.remote.client import OpenAIBackend
from grounding.cli.app import app
from grounding.core.result import Box, Result
from grounding.io.records import pick_record, read_records
from grounding.pipeline.crops import crop_with_context
from grounding.pipeline.qa import (
    all_prompt,
    answer_attributes,
    ask,
    ask_with_answers,
    first_object,
    numbered,
    record_result,
)
from grounding.testing import tiny_checkpoint
from grounding.testing.loopback import LoopbackServer, Reply, completion, server_error

GRAY = (128, 128, 128)
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
RECTS = {"red": (20, 20, 80, 70), "blue": (120, 30, 190, 90), "green": (60, 100, 140, 140)}
QUESTION = 'What colour is this {label}? Answer in JSON as {"color": ...}.'


# ------------------------------------------------------------------------------ answers


def test_first_json_object_in_an_answer():
    assert first_object('```json\n{"color": "red"}\n```') == {"color": "red"}
    assert first_object("It is {'color': 'red', 'size': 3,} I think.") == {"color": "red",
                                                                           "size": 3}
    assert first_object('{not json} but {"a": {"b": "}"}}') == {"a": {"b": "}"}}
    assert first_object("It is red.") is None
    assert first_object("[1, 2]") is None
    assert first_object('{"cut": "off') is None


def test_answer_attributes_merge_json_or_keep_the_text():
    assert answer_attributes('Sure: {"color": "red", "parked": true}') == {"color": "red",
                                                                           "parked": True}
    assert answer_attributes("  It is red.\n") == {"answer": "It is red."}
    assert answer_attributes("{}") == {"answer": "{}"}


def test_all_prompt():
    assert all_prompt("Which is biggest?", 3) == "The boxes are numbered 1 to 3. Which is biggest?"
    assert all_prompt("Which is biggest?", 1) == "The box is numbered 1. Which is biggest?"
    assert all_prompt("What is here?", 0) == "What is here?"


def picture():
    a = np.empty((160, 220, 3), np.uint8)
    a[:] = GRAY
    for name, (x0, y0, x1, y1) in RECTS.items():
        a[y0:y1, x0:x1] = COLOURS[name]
    return Image.fromarray(a)


def result_for(image=None, path="scene.png"):
    image = image or picture()
    boxes = [Box(tuple(float(v) for v in RECTS[n]), f"{n} thing", 0, 0.9, {"kept": 1})
             for n in RECTS]
    return Result(boxes=boxes, width=image.width, height=image.height, image=path,
                  model="m", dialect="qwen2.5-vl").attach(image)


def test_numbered_draws_every_box_and_its_number():
    image = picture()
    drawn = np.asarray(numbered(image, result_for(image)))
    changed = (drawn != np.asarray(image)).any(axis=2)
    for x0, y0, x1, y1 in RECTS.values():
        assert changed[(y0 + y1) // 2, x0 - 1 : x0 + 2].any()  # left edge
        assert not changed[(y0 + y1) // 2 + 5, (x0 + x1) // 2 + 5]  # inside untouched
    assert np.array_equal(np.asarray(numbered(image, Result(width=220, height=160))),
                          np.asarray(image))


# -------------------------------------------------------------------------- loopback


def middle_colour(image) -> str | None:
    a = np.asarray(image.convert("RGB"), dtype=np.int32)
    pixel = a[a.shape[0] // 2, a.shape[1] // 2]
    for name, rgb in COLOURS.items():
        if np.abs(pixel - rgb).max() < 40:
            return name
    return None


def answering(request):
    """Each: JSON for red and blue crops, prose for green. All: names the numbers."""
    if request.text.startswith("The boxes are numbered"):
        return Reply(200, completion("Box 2 is the largest.", model=request.model))
    colour = middle_colour(request.image())
    if colour == "green":
        return Reply(200, completion("It looks green to me.", model=request.model))
    return Reply(200, completion(f'```json\n{{"color": "{colour}"}}\n```', model=request.model))


def backend_for(server, **options):
    options.setdefault("image_format", "png")  # the crops are compared pixel for pixel
    return OpenAIBackend("loopback-model", base_url=server.base_url, dialect="qwen2.5-vl",
                         backoff=0.01, max_backoff=0.05, timeout=10.0, **options)


def test_ask_each_stores_answers_as_attributes():
    result = result_for()
    with LoopbackServer(handler=answering, latency=0.05) as server:
        backend = backend_for(server, concurrency=2)
        answered, texts = ask_with_answers(result, None, backend, QUESTION)
        requests = server.completions
        backend.close()
    assert server.errors == [] and server.max_in_flight == 2
    assert [b.attributes for b in answered.boxes] == [
        {"kept": 1, "color": "red"}, {"kept": 1, "color": "blue"},
        {"kept": 1, "answer": "It looks green to me."}]
    assert texts[2] == "It looks green to me." and texts[0].startswith("```json")
    assert [b.attributes for b in result.boxes] == [{"kept": 1}] * 3  # input left alone
    # {label} filled in per box, and each crop is exactly the crop of its box
    assert sorted(r.text for r in requests) == sorted(
        f'What colour is this {n} thing? Answer in JSON as {{"color": ...}}.' for n in RECTS)
    received = [np.asarray(r.image().convert("RGB")) for r in requests]
    for box in result.boxes:
        crop, _ = crop_with_context(result._image, box)
        sent = np.asarray(crop.resize(backend.frame(crop.size), Image.Resampling.BICUBIC))
        assert any(s.shape == sent.shape and np.array_equal(s, sent) for s in received)


def test_ask_all_sends_the_numbered_image_once_and_keeps_the_answer():
    result = result_for()
    with LoopbackServer(handler=answering) as server:
        backend = backend_for(server)
        answered = result.ask("Which box is the largest?", backend, about="all")
        [request] = server.completions
        backend.close()
    assert request.text == "The boxes are numbered 1 to 3. Which box is the largest?"
    expected = numbered(result._image, result)
    expected = expected.resize(backend.frame(expected.size), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(request.image().convert("RGB")), np.asarray(expected))
    assert answered.answers == [{"question": "Which box is the largest?",
                                 "answer": "Box 2 is the largest."}]
    record = answered.to_record()
    assert list(record)[-2:] == ["dropped", "answers"]
    assert Result.from_record(json.loads(json.dumps(record))) == answered
    assert "answers" not in result.to_record()


def test_a_failed_question_is_kept_on_its_box():
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        return server_error(500, "boom") if calls["n"] == 1 else answering(request)

    with LoopbackServer(handler=flaky) as server:
        backend = backend_for(server, concurrency=1, max_retries=0)
        answered = ask(result_for(), None, backend, QUESTION)
        failed_all = ask(result_for(), None, backend, "Which?", about="all")
        backend.close()
    assert "boom" in answered.boxes[0].attributes["ask_error"]
    assert answered.boxes[1].attributes["color"] == "blue"
    assert failed_all.answers[0]["answer"] is not None  # the second call succeeded


def test_ask_checks_its_inputs():
    result = result_for()
    with pytest.raises(ValueError, match="about"):
        ask(result, None, None, "Why?", about="some")
    with pytest.raises(ValueError, match="is 10x10 but the result is for 220x160"):
        ask(result, Image.new("RGB", (10, 10)), None, "Why?")
    with pytest.raises(ValueError, match="error record"):
        ask(Result(error="broken"), None, None, "Why?")


def test_ask_each_with_the_tiny_local_model():
    """Same interface, local backend: every box gets an answer (garbage text from random
    weights, kept as attributes.answer unless it happens to hold a JSON object)."""
    backend = LocalBackend(str(tiny_checkpoint("qwen2.5-vl")), max_new_tokens=4)
    answered, texts = ask_with_answers(result_for(), None, backend, "What is it?", batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    for box, text in zip(answered.boxes, texts, strict=True):
        assert "ask_error" not in box.attributes
        assert box.attributes == {"kept": 1, **answer_attributes(text)}


# ---------------------------------------------------------------------- record files


def test_read_records_json_list_and_lines(tmp_path):
    one = {"image": "a.png", "detections": []}
    two = {"image": "b.png", "detections": []}
    (tmp_path / "one.json").write_text(json.dumps(one, indent=1))
    (tmp_path / "many.jsonl").write_text(json.dumps(one) + "\n\n" + json.dumps(two) + "\n")
    (tmp_path / "list.json").write_text(json.dumps([one, two]))
    (tmp_path / "bad.jsonl").write_text(json.dumps(one) + "\nnot json\n")
    assert read_records(tmp_path / "one.json") == [one]
    assert read_records(tmp_path / "many.jsonl") == [one, two]
    assert read_records(tmp_path / "list.json") == [one, two]
    with pytest.raises(GroundingError, match=r"bad\.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(GroundingError, match="cannot read"):
        read_records(tmp_path / "missing.json")


def test_pick_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = [{"image": "photos/a.jpg"}, {"image": "sub/a.jpg"}, {"image": "b.jpg"},
               {"image": str(tmp_path / "c.jpg")}]
    assert pick_record(records, "photos/a.jpg") is records[0]
    assert pick_record(records, tmp_path / "photos" / "a.jpg") is records[0]
    assert pick_record(records, "/data/run/images/sub/a.jpg") is records[1]
    assert pick_record(records, "c.jpg") is records[3]
    assert pick_record(records, "elsewhere/b.jpg") is records[2]  # label runs: relative
    assert pick_record([{"image": "<PIL image RGB 9x9>"}], "x.png")["image"].startswith("<PIL")
    with pytest.raises(GroundingError, match="no record"):
        pick_record(records, "d.jpg")
    with pytest.raises(GroundingError, match="2 records"):
        pick_record([{"image": "a.jpg"}, {"image": "a.jpg"}], "a.jpg")


# ------------------------------------------------------------------------------- CLI


def test_cli_ask_each_and_all(tmp_path):
    image = tmp_path / "scene.png"
    picture().save(image)
    other = result_for(path=str(tmp_path / "other.png")).to_record()
    record = result_for(path=str(image)).to_record()
    detections = tmp_path / "detections.jsonl"
    detections.write_text(json.dumps(other) + "\n" + json.dumps(record) + "\n")
    runner = CliRunner()
    with LoopbackServer(handler=answering) as server:
        backend = ["--backend", "openai", "--base-url", server.base_url, "--model", "loopback",
                   "--dialect", "qwen2.5-vl"]
        each = runner.invoke(app, ["ask", str(image), QUESTION, "--detections", str(detections),
                                   "--out", str(tmp_path / "each.json"), *backend])
        every = runner.invoke(app, ["ask", str(image), "--detections",
                                    str(tmp_path / "each.json"), "Which box is the largest?",
                                    "--about", "all", "--out", str(tmp_path / "all.json"),
                                    "--image-format", "png", *backend])
        wrong = runner.invoke(app, ["ask", str(tmp_path / "small.png"), "Why?",
                                    "--detections", str(tmp_path / "each.json"), *backend])
        sent = [r.image_bytes()[0][0] for r in server.completions]
    assert sent[-1] == "image/png" and set(sent[:-1]) == {"image/jpeg"}  # --image-format
    assert each.exit_code == 0, each.output
    for text in ("red thing", "blue thing", "It looks green to me.", '"color": "red"'):
        assert text in each.stdout
    updated = json.loads((tmp_path / "each.json").read_text())
    assert [d["attributes"] for d in updated["detections"]] == [
        {"kept": 1, "color": "red"}, {"kept": 1, "color": "blue"},
        {"kept": 1, "answer": "It looks green to me."}]
    assert updated["image"] == str(image) and "answers" not in updated
    assert every.exit_code == 0, every.output
    assert every.stdout.strip() == "Box 2 is the largest."
    final = json.loads((tmp_path / "all.json").read_text())
    assert final["answers"] == [{"question": "Which box is the largest?",
                                 "answer": "Box 2 is the largest."}]
    assert final["detections"] == updated["detections"]
    assert wrong.exit_code == 2 and "small.png" in wrong.stderr


def test_cli_ask_size_mismatch_is_one_line(tmp_path):
    image = tmp_path / "scene.png"
    picture().resize((100, 80)).save(image)
    record = tmp_path / "r.json"
    record.write_text(result_for(path=str(image)).to_json())
    out = CliRunner().invoke(app, ["ask", str(image), "Why?", "--detections", str(record),
                                   "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                                   "--model", "m", "--dialect", "qwen2.5-vl"])
    assert out.exit_code == 2
    assert "100x80 but the record is for 220x160" in out.stderr
    assert out.stderr.count("\n") == 1


def _ask_cli(image, record_path):
    return CliRunner().invoke(app, ["ask", str(image), "Why?", "--detections", str(record_path),
                                    "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                                    "--model", "m", "--dialect", "qwen2.5-vl"])


def test_cli_ask_refuses_the_record_of_another_image_of_the_same_size(tmp_path):
    image, other = tmp_path / "scene.png", tmp_path / "other.png"
    picture().save(image)
    picture().save(other)  # same size: only the name tells them apart
    record = tmp_path / "other.json"
    record.write_text(result_for(path=str(other)).to_json())
    out = _ask_cli(image, record)
    assert out.exit_code == 2
    assert out.stderr.count("\n") == 1
    assert "other.json holds the detections of" in out.stderr and "other.png" in out.stderr
    assert "scene.png" in out.stderr
    # The same image named another way is still its record: relative to another folder
    # (a label run), or as written from another working directory.
    for named in ("scene.png", str(tmp_path.name) + "/scene.png", str(image)):
        assert record_result(result_for(path=named).to_record(), image, record).width == 220


@pytest.mark.parametrize("content", [{"foo": 1}, [{"foo": 1}, {"bar": 2}], {"image": "x"}])
def test_cli_ask_refuses_a_file_that_is_not_a_record(tmp_path, content):
    image = tmp_path / "scene.png"
    picture().save(image)
    record = tmp_path / "foo.json"
    record.write_text(json.dumps(content))
    out = _ask_cli(image, record)
    assert out.exit_code == 2
    assert out.stderr.count("\n") == 1
    assert "foo.json is not a grounding record" in out.stderr


def test_record_result_refuses_records_without_an_image_size(tmp_path):
    record = Result(boxes=[Box((1, 2, 3, 4), "a")], image="a.png").to_record()
    with pytest.raises(GroundingError, match=r"r\.json: the record has no image size"):
        record_result(record, tmp_path / "a.png", tmp_path / "r.json")
    pil = result_for(path="<PIL image RGB 220x160>").to_record()  # Python API: no file name
    assert record_result(pil, tmp_path / "a.png", "r.json").height == 160
