"""Synthetic scenes (grounding.testing.scenes) and the loopback's short-sighted scene model
(grounding.testing.loopback.scene_handler): the generator draws exactly its truth; the
model finds exactly that truth in every dialect when it sees the image at full size,
misses the objects that the client's downscale shrinks below ``min_size``, writes
duplicates, repeats its last line until the token limit, and answers only about the
classes the prompt names (only the first with ``first_only``)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

from grounding import evaluate, load_image, parse
from grounding.backends.remote.client import OpenAIBackend
from grounding.core.dialects import get_dialect
from grounding.formats.coco import load_coco
from grounding.pipeline.detector import Detector
from grounding.pipeline.prompts import expression_prompt
from grounding.testing.answers import answer_objects, answer_text
from grounding.testing.loopback import (
    LoopbackRequest,
    LoopbackServer,
    classes_asked,
    scene_handler,
    tokenize,
)
from grounding.testing.scenes import (
    DEFAULT_CLASSES,
    Scene,
    SceneObject,
    colour_boxes,
    save_scene,
    scene,
    scenes,
    write_dataset,
)

DIALECTS = ("qwen2.5-vl", "qwen3-vl", "qwen2-vl", "qwen-vl", "deepseek-vl2")
CLASSES = list(DEFAULT_CLASSES)
SMALL, LARGE = (20, 30), (120, 260)
"""Object sides in the 1600x1200 scenes: a small object shrinks below 16 px when the
image is sent at about 200,000 px (a third of each side); a large one stays well above."""


def truth_of(s: Scene, labels=None) -> list[tuple[str, tuple[int, int, int, int]]]:
    return sorted((o.label, o.box) for o in s.objects if labels is None or o.label in labels)


def to_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(handler, image: Image.Image, text: str, max_tokens: int | None = 2048) -> dict:
    """The handler's answer body to one chat request, without a server."""
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": to_url(image)}},
        {"type": "text", "text": text}]}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    request = LoopbackRequest(0, "POST", "/v1/chat/completions", {}, json.dumps(body).encode(),
                              body)
    reply = asyncio.run(handler(request))
    assert reply.status == 200, reply.body
    return reply.body


def boxes_in_frame(text: str, dialect: str, size: tuple[int, int]) -> list[tuple[str, tuple]]:
    """The answer's boxes in pixels of the frame the model saw."""
    d = get_dialect(dialect)
    w, h = size
    out = []
    for o in parse(text, d).objects:
        x1, y1, x2, y2 = o.coords
        if d.is_relative:
            x1, x2, y1, y2 = x1 / d.norm * w, x2 / d.norm * w, y1 / d.norm * h, y2 / d.norm * h
        out.append((o.label, (x1, y1, x2, y2)))
    return out


def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_same_boxes(found, truth, tol: tuple[float, float]) -> None:
    found, truth = sorted(found), sorted(truth)
    assert [f[0] for f in found] == [t[0] for t in truth], (found, truth)
    for (_, f), (_, t) in zip(found, truth, strict=True):
        errors = [abs(f[i] - t[i]) for i in range(4)]
        assert max(errors[0], errors[2]) <= tol[0] and max(errors[1], errors[3]) <= tol[1], (
            f, t, errors, tol)


@pytest.fixture(scope="module")
def mixed() -> Scene:
    """1600x1200: small and large objects of the three classes."""
    return scene(1600, 1200, 12, seed=7, sizes=[SMALL, LARGE])


@pytest.fixture(scope="module")
def plain() -> Scene:
    return scene(480, 360, 6, seed=3, sizes=[(24, 60)])


# ------------------------------------------------------------------------- the scenes


def test_a_scene_is_deterministic_and_draws_exactly_its_truth(mixed):
    again = scene(1600, 1200, 12, seed=7, sizes=[SMALL, LARGE])
    assert again.objects == mixed.objects
    assert np.array_equal(np.asarray(again.image), np.asarray(mixed.image))
    other = scene(1600, 1200, 12, seed=8, sizes=[SMALL, LARGE])
    assert other.objects != mixed.objects
    assert mixed.size == (1600, 1200) and mixed.image.mode == "RGB"
    assert mixed.classes == CLASSES
    # sizes in turn, classes in turn every two objects: every class gets both sizes
    assert [o.label for o in mixed.objects] == [c for c in CLASSES for _ in "ab"] * 2
    sides = [min(o.width, o.height) for o in mixed.objects]
    assert all(SMALL[0] <= v <= SMALL[1] for v in sides[::2])
    assert all(LARGE[0] <= v for v in sides[1::2])
    assert sorted(colour_boxes(mixed.image)) == truth_of(mixed)


def test_objects_keep_apart_and_off_the_border(mixed):
    gap = max(8, 1200 // 100)
    boxes = mixed.boxes()
    for i, a in enumerate(boxes):
        assert gap <= a[0] < a[2] <= 1600 - gap and gap <= a[1] < a[3] <= 1200 - gap
        for b in boxes[i + 1:]:
            assert (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
                    or b[3] + gap <= a[1]), (a, b)


def test_the_ground_has_no_class_colour_and_objects_are_solid(plain):
    empty = scene(400, 300, [], seed=1)
    assert empty.objects == [] and colour_boxes(empty.image) == []
    a = np.asarray(empty.image).astype(int)
    assert a.std() > 10  # textured, not flat
    assert np.abs(a[..., 0] - a[..., 1]).max() <= 8  # grey
    x0, y0, x1, y1 = plain.objects[0].box
    inside = np.asarray(plain.image)[y0:y1, x0:x1]
    assert (inside == DEFAULT_CLASSES[plain.objects[0].label]).all()


def test_objects_given_are_drawn_as_given_and_bad_ones_refused():
    s = scene(200, 100, [("green box", (10, 20, 30, 40)),
                         SceneObject("red box", (50, 10, 51, 11))], seed=0)
    assert s.objects == [SceneObject("green box", (10, 20, 30, 40)),
                         SceneObject("red box", (50, 10, 51, 11))]
    assert sorted(colour_boxes(s.image)) == truth_of(s)
    assert colour_boxes(s.image, min_size=2) == [("green box", (10, 20, 30, 40))]
    with pytest.raises(ValueError, match="no colour"):
        scene(200, 100, [("cat", (1, 1, 5, 5))])
    with pytest.raises(ValueError, match="not inside"):
        scene(200, 100, [("red box", (150, 10, 250, 20))])
    with pytest.raises(ValueError, match="cannot place"):
        scene(200, 100, 40, sizes=[(30, 40)])
    with pytest.raises(ValueError, match="pure colour"):
        scene(200, 100, 2, classes={"grey": (128, 128, 128)})


def test_other_pure_colours_are_told_apart():
    classes = {"yellow box": (255, 255, 0), "red box": (255, 0, 0), "cyan box": (0, 255, 255),
               "magenta box": (255, 0, 255)}
    s = scene(600, 400, 8, seed=4, classes=classes)
    assert sorted(colour_boxes(s.image, classes)) == truth_of(s)
    shrunk = s.image.resize((300, 200), Image.Resampling.BICUBIC)
    found = colour_boxes(shrunk, classes)
    assert sorted(label for label, _ in found) == sorted(o.label for o in s.objects)


def test_scenes_and_the_dataset_writer(tmp_path):
    made = list(scenes(3, 320, 240, 4, seed=5))
    assert [s.objects for s in made] == [scene(320, 240, 4, seed=5 + i).objects
                                         for i in range(3)]
    data = write_dataset(tmp_path / "set", made, image_format="png")
    assert data.images_dir == tmp_path / "set" / "images" and data.classes == CLASSES
    assert data.files == ["scene_000.png", "scene_001.png", "scene_002.png"]
    assert data.objects == 12
    gt = load_coco(data.truth)
    assert [im.path for im in gt.images] == data.files
    for im, s in zip(gt.images, made, strict=True):
        assert (im.width, im.height) == s.size
        assert sorted((gt.names[b.category_id], (b.x1, b.y1, b.x2, b.y2)) for b in im.boxes
                      ) == truth_of(s)
        assert np.array_equal(np.asarray(load_image(data.images_dir / im.path)),
                              np.asarray(s.image))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_rotated_files_show_the_scene(tmp_path, orientation):
    s = scene(120, 80, 3, seed=orientation, sizes=[(10, 20)])
    path = save_scene(s, tmp_path / "s.png", orientation=orientation)
    with Image.open(path) as stored:
        assert stored.getexif().get(0x0112) == orientation
        assert stored.size == ((80, 120) if orientation >= 5 else (120, 80))
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(s.image))


# ------------------------------------------------------------- the handler on its own


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_model_finds_every_object_in_the_frame_it_gets(plain, dialect):
    body = ask(scene_handler(dialect, min_size=1), plain.image,
               "red box, green box, blue box")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    found = boxes_in_frame(choice["message"]["content"], dialect, plain.size)
    assert_same_boxes(found, truth_of(plain), (1e-3, 1e-3))


def test_it_answers_only_the_classes_named_in_the_order_named(plain):
    handler = scene_handler("qwen2.5-vl", min_size=1)
    text = ask(handler, plain.image, "Outline each blue box and red box.")["choices"][0][
        "message"]["content"]
    found = boxes_in_frame(text, "qwen2.5-vl", plain.size)
    assert sorted(found) == truth_of(plain, {"blue box", "red box"})
    assert [label for label, _ in found] == ["blue box"] * 2 + ["red box"] * 2
    nothing = ask(handler, plain.image, "Outline each cat.")["choices"][0]["message"]
    assert nothing["content"] == answer_text("qwen2.5-vl", None, "")
    assert classes_asked("find the Green Box, then the red box", CLASSES) == [
        "green box", "red box"]
    assert classes_asked("find the Green Box, then the red box", CLASSES,
                         first_only=True) == ["green box"]


@pytest.mark.parametrize("dialect", ["qwen2-vl", "deepseek-vl2"])
def test_first_only_grounds_the_first_class_of_a_list(plain, dialect):
    handler = scene_handler(dialect, min_size=1, first_only=True)
    prompt = expression_prompt(dialect, "green box, red box")  # one phrase, two classes
    text = ask(handler, plain.image, prompt)["choices"][0]["message"]["content"]
    found = boxes_in_frame(text, dialect, plain.size)
    assert_same_boxes(found, truth_of(plain, {"green box"}), (1e-3, 1e-3))


def test_objects_under_min_size_are_not_seen():
    s = scene(400, 300, [("red box", (10, 10, 25, 40)), ("red box", (100, 100, 116, 116)),
                         ("green box", (200, 50, 300, 65))], seed=0)
    text = ask(scene_handler("qwen2.5-vl", min_size=16), s.image,
               "red box, green box")["choices"][0]["message"]["content"]
    assert [b for _, b in boxes_in_frame(text, "qwen2.5-vl", s.size)] == [(100, 100, 116, 116)]


def test_duplicates_are_written_right_after_each_object(plain):
    handler = scene_handler("qwen2.5-vl", min_size=1, duplicates=2)
    text = ask(handler, plain.image, "red box, green box, blue box")["choices"][0][
        "message"]["content"]
    found = boxes_in_frame(text, "qwen2.5-vl", plain.size)
    assert len(found) == 3 * len(plain.objects)
    originals = found[::3]
    assert sorted(originals) == truth_of(plain)
    identical = 0
    for i, (label, box) in enumerate(originals):
        for copy_label, copy in found[3 * i + 1:3 * i + 3]:
            assert copy_label == label and iou(box, copy) > 0.75
            assert max(abs(a - b) for a, b in zip(box, copy, strict=True)) <= 2
            identical += copy == box
    assert 0 < identical < 2 * len(plain.objects)
    again = ask(handler, plain.image, "red box, green box, blue box")
    assert again["choices"][0]["message"]["content"] == text  # deterministic


@pytest.mark.parametrize("dialect", DIALECTS)
def test_repeat_until_limit_cuts_at_max_tokens(plain, dialect):
    handler = scene_handler(dialect, min_size=1, repeat_until_limit=True)
    body = ask(handler, plain.image, "red box, green box, blue box", max_tokens=1200)
    choice = body["choices"][0]
    text = choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert len(tokenize(text)) == 1200 == body["usage"]["completion_tokens"]
    found = boxes_in_frame(text, dialect, plain.size)
    n = len(plain.objects)
    assert sorted(found[:n]) == sorted(boxes_in_frame(
        ask(scene_handler(dialect, min_size=1), plain.image, "red box, green box, blue box")[
            "choices"][0]["message"]["content"], dialect, plain.size))
    assert len(found) > n + 5 and all(f == found[n - 1] for f in found[n:])


def test_a_long_answer_is_cut_at_the_limit_even_without_repetition(plain):
    body = ask(scene_handler("qwen2.5-vl", min_size=1), plain.image, "red box, blue box",
               max_tokens=20)
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(tokenize(body["choices"][0]["message"]["content"])) == 20
    nothing = ask(scene_handler("qwen2.5-vl", repeat_until_limit=True), plain.image, "a cat")
    assert nothing["choices"][0]["finish_reason"] == "stop"


def test_answer_objects_writes_several_boxes_and_keeps_answer_text():
    for dialect in DIALECTS:
        objects = [((1, 2, 3, 4), "red box"), ((5.5, 6, 7, 8), "blue box")]
        parsed = parse(answer_objects(dialect, objects), dialect).objects
        assert [(o.label, o.coords) for o in parsed] == [
            ("red box", (1, 2, 3, 4)), ("blue box", (5.5, 6, 7, 8))]
        assert answer_objects(dialect, objects[:1]) == answer_text(dialect, (1, 2, 3, 4),
                                                                     "red box")
        assert answer_objects(dialect, []) == answer_text(dialect, None, "x")


# ------------------------------------------------- through the server and the backend


def backend(server: LoopbackServer, dialect: str = "qwen2.5-vl", **options) -> OpenAIBackend:
    options.setdefault("backoff", 0.01)
    options.setdefault("max_backoff", 0.05)
    return OpenAIBackend("loopback-model", base_url=server.base_url, dialect=dialect,
                         **options)


def one_frame_pixel(b: OpenAIBackend, size: tuple[int, int]) -> tuple[float, float]:
    fw, fh = b.frame(size)
    return size[0] / fw + 1e-6, size[1] / fh + 1e-6


@pytest.mark.parametrize("dialect", DIALECTS)
def test_through_the_backend_every_object_comes_back_on_its_truth(plain, dialect):
    with LoopbackServer(handler=scene_handler(dialect, min_size=4)) as server:
        b = backend(server, dialect)  # a JPEG of the frame, as by default
        try:
            result = Detector(b).detect(plain.image, classes=CLASSES)
        finally:
            b.close()
    assert result.error is None, result.error
    assert_same_boxes([(x.label, x.bbox) for x in result.boxes], truth_of(plain),
                      one_frame_pixel(b, plain.size))


def test_small_objects_are_missed_when_the_client_downsizes(mixed):
    small = truth_of(mixed)
    large = [t for t in small if min(t[1][2] - t[1][0], t[1][3] - t[1][1]) >= LARGE[0]]
    assert 0 < len(large) < len(small)
    with LoopbackServer(handler=scene_handler("qwen2.5-vl", min_size=16)) as server:
        near, far = backend(server, max_pixels=2_000_000), backend(server, max_pixels=200_000)
        try:
            seen = Detector(near).detect(mixed.image, classes=CLASSES)
            shrunk = Detector(far).detect(mixed.image, classes=CLASSES)
        finally:
            near.close()
            far.close()
        received = [r.image().size for r in server.completions]
    assert received == [near.frame(mixed.size), far.frame(mixed.size)]
    assert received[1][0] < 1600 / 3 + 28  # about a third of each side
    assert_same_boxes([(x.label, x.bbox) for x in seen.boxes], small,
                      one_frame_pixel(near, mixed.size))
    assert_same_boxes([(x.label, x.bbox) for x in shrunk.boxes], large,
                      one_frame_pixel(far, mixed.size))


def test_tiles_find_the_small_objects_the_whole_image_misses(mixed):
    truth = truth_of(mixed)
    large = [t for t in truth if min(t[1][2] - t[1][0], t[1][3] - t[1][1]) >= LARGE[0]]
    with LoopbackServer(handler=scene_handler("qwen2.5-vl", min_size=16,
                                              duplicates=1)) as server:
        b = backend(server, max_pixels=200_000)
        try:
            whole = Detector(b).detect(mixed.image, classes=CLASSES)
            calls = server.calls
            tiled = Detector(b).detect(mixed.image, classes=CLASSES, tiles="auto")
            tiles = server.calls - calls
        finally:
            b.close()
    assert calls == 1 and tiles > 4
    # the box kept of an object and its copy may be the copy (the better scored): 2 px off
    tol = tuple(3 * v for v in one_frame_pixel(b, mixed.size))
    assert_same_boxes([(x.label, x.bbox) for x in whole.boxes], large, tol)
    found = sorted((x.label, x.bbox) for x in tiled.boxes)
    assert [f[0] for f in found] == [t[0] for t in truth], (found, truth)
    assert all(iou(f[1], t[1]) > 0.8 for f, t in zip(found, truth, strict=True))
    # the model's copies and the overlaps' second sightings: gone, and counted
    assert tiled.dropped.get("duplicate", 0) + tiled.dropped.get("fused", 0) >= len(truth)


def test_a_model_that_grounds_the_first_class_needs_per_class_requests(plain):
    with LoopbackServer(handler=scene_handler("qwen2.5-vl", min_size=4,
                                              first_only=True)) as server:
        b = backend(server)
        try:
            joined = Detector(b).detect(plain.image, classes=CLASSES, per_class=False)
            calls = server.calls
            split = Detector(b).detect(plain.image, classes=CLASSES, per_class=True)
            requests = server.calls - calls
        finally:
            b.close()
    assert calls == 1 and requests == len(CLASSES)
    assert {x.label for x in joined.boxes} == {"red box"}
    assert_same_boxes([(x.label, x.bbox) for x in split.boxes], truth_of(plain),
                      one_frame_pixel(b, plain.size))


def test_duplicates_reach_the_record_as_written(plain):
    with LoopbackServer(handler=scene_handler("qwen3-vl", min_size=4, duplicates=1)) as server:
        b = backend(server, "qwen3-vl")
        try:
            result = Detector(b).detect(plain.image, classes=CLASSES)
        finally:
            b.close()
    assert len(parse(result.raw, "qwen3-vl").objects) == 2 * len(plain.objects)
    # whatever the pipeline does with them (kept, or dropped and counted as duplicates)
    assert len(result.boxes) + result.dropped.get("duplicate", 0) == 2 * len(plain.objects)
    truth = truth_of(plain)
    assert all(any(iou(x.bbox, t[1]) > 0.75 for t in truth) for x in result.boxes)


def test_repetition_until_the_limit_is_a_truncated_generation(plain):
    handler = scene_handler("qwen2.5-vl", min_size=4, repeat_until_limit=True)
    with LoopbackServer(handler=handler) as server:
        b = backend(server, max_new_tokens=1000)
        try:
            result = Detector(b).detect(plain.image, classes=CLASSES)
        finally:
            b.close()
        assert server.completions[0].json["max_tokens"] == 1000
    assert result.error is None and result.truncated and result.generation.truncated
    assert len(tokenize(result.raw)) == 1000
    parsed = parse(result.raw, "qwen2.5-vl").objects
    assert len(parsed) > len(plain.objects) + 5
    assert len({(x.label, x.bbox) for x in result.boxes}) >= len(plain.objects)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_repeating_answer_is_flagged_and_its_objects_kept_once(plain, dialect):
    handler = scene_handler(dialect, min_size=4, duplicates=1, repeat_until_limit=True)
    with LoopbackServer(handler=handler) as server:
        b = backend(server, dialect, max_new_tokens=1000)
        try:
            result = Detector(b).detect(plain.image, classes=CLASSES, per_class=False)
        finally:
            b.close()
    assert result.truncated and result.repetition
    assert len(parse(result.raw, dialect).objects) > 2 * len(plain.objects) + 5
    tol = tuple(3 * v for v in one_frame_pixel(b, plain.size))  # a copy may be kept
    assert_same_boxes([(x.label, x.bbox) for x in result.boxes], truth_of(plain), tol)
    assert result.dropped["duplicate"] > len(plain.objects) + 5


def test_exif_rotated_jpegs_are_scored_in_the_displayed_frame(tmp_path):
    made = list(scenes(4, 400, 300, 4, seed=11, sizes=[(30, 60)]))
    data = write_dataset(tmp_path / "set", made, orientations=(1, 6, 3, 8))
    with Image.open(data.images_dir / data.files[1]) as stored:
        assert stored.size == (300, 400)  # stored turned
    with LoopbackServer(handler=scene_handler("qwen2.5-vl", min_size=4)) as server:
        b = backend(server)
        try:
            results = list(Detector(b).detect_many(
                [data.images_dir / f for f in data.files], classes=CLASSES))
        finally:
            b.close()
    records = []
    for name, s, result in zip(data.files, made, results, strict=True):
        assert (result.width, result.height) == s.size
        assert_same_boxes([(x.label, x.bbox) for x in result.boxes], truth_of(s), (1.5, 1.5))
        record = result.to_record()
        record["image"] = name
        records.append(record)
    report = evaluate(records, CLASSES, data.truth)
    assert report.images_matched == 4
    assert report.precision == 1.0 and report.recall == 1.0 and report.map50 == pytest.approx(1)


# ------------------------------------------------------------------- command line


def test_the_command_serves_the_scene_model():
    process = subprocess.Popen(
        [sys.executable, "-m", "grounding.testing.loopback", "--port", "0", "--scene",
         "--min-size", "4", "--duplicates", "1", "--dialect", "qwen2.5-vl"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert found and "scene" in line, line
        s = scene(200, 150, [("red box", (20, 30, 60, 70)), ("blue box", (100, 40, 140, 90))])
        body = {"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": to_url(s.image)}},
            {"type": "text", "text": "red box"}]}]}
        request = urllib.request.Request(f"{found.group(1)}/chat/completions",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = json.loads(answer.read())["choices"][0]["message"]["content"]
        assert [b for _, b in boxes_in_frame(text, "qwen2.5-vl", s.size)] == [
            (20, 30, 60, 70)] * 2
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=10)
        assert process.returncode == 0 and "stopped" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
