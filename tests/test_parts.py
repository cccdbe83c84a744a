"""Several requests per image through the batched (local) path: one per class, one per
tile, both; the prompts sent, the labels given, the record made; and on the tiny
checkpoint, the real transformers path with tiles."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding import Detector, Query, Tiling
from grounding.cli import app
from grounding.testing import StaticBackend


class Recording(StaticBackend):
    """The static backend, keeping every request it was sent."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list = []
        self.batches: list[int] = []

    def generate(self, requests: list) -> list:
        self.sent += requests
        self.batches.append(len(requests))
        return super().generate(requests)


@pytest.mark.parametrize("dialect, auto", [("qwen2.5-vl", False), ("qwen3-vl", False),
                                           ("qwen2-vl", True), ("qwen-vl", True),
                                           ("deepseek-vl2", True)])
def test_one_reference_dialects_ask_one_class_per_request(dialect, auto):
    query = Query.make(["person", "car"])
    assert query.asks_per_class(dialect) is auto
    prompts = [a.prompt for a in query.asks(dialect)]
    if auto:
        assert len(prompts) == 2 and "person" in prompts[0] and "car" not in prompts[0]
    else:
        assert len(prompts) == 1 and "person, car" in prompts[0]
    assert Query.make(["person", "car"], per_class=False).asks_per_class(dialect) is False
    assert Query.make(["person", "car"], per_class=True).asks_per_class(dialect) is True


def test_per_class_answers_are_labelled_with_the_class_they_asked_for():
    backend = Recording("qwen2-vl", label="thing")  # the model's own word is "thing"
    image = Image.new("RGB", (640, 480), "gray")
    result = Detector(backend).detect(image, ["cat", "dog"])
    assert [r.prompt for r in backend.sent] == [
        "Find <|object_ref_start|>cat<|object_ref_end|> in the image.",
        "Find <|object_ref_start|>dog<|object_ref_end|> in the image."]
    assert [(b.label, b.class_id, b.model_label) for b in result.boxes] == [
        ("cat", 0, "thing"), ("dog", 1, "thing")]
    assert [(r["class"], r["tile"]) for r in result.requests] == [("cat", None),
                                                                  ("dog", None)]
    assert result.classes == ["cat", "dog"] and result.dropped == {}


def test_a_prompt_of_ones_own_takes_each_class_in_its_placeholder():
    backend = Recording("qwen2.5-vl")
    image = Image.new("RGB", (640, 480), "gray")
    Detector(backend).detect(image, ["cat", "dog"], prompt="Where is every {class}?",
                             per_class=True)
    assert [r.prompt for r in backend.sent] == ["Where is every cat?", "Where is every dog?"]
    with pytest.raises(ValueError, match=r"\{class\}"):
        Query.make(["cat"], "Find cats.", per_class=True)
    with pytest.raises(ValueError, match="need classes"):
        Query.make(None, "the red car", per_class=True)
    # Asked together, {class} takes every class.
    backend.sent.clear()
    Detector(backend).detect(image, ["cat", "dog"], prompt="Where is every {class}?")
    assert [r.prompt for r in backend.sent] == ["Where is every cat, dog?"]
    # A one-reference dialect with a prompt of one's own and no {class}: one request.
    assert not Query.make(["cat", "dog"], "Find pets.").asks_per_class("qwen2-vl")


def test_tiles_times_classes_are_batched_across_images_and_land_in_their_tiles():
    backend = Recording("qwen2.5-vl")
    images = [Image.new("RGB", (1200, 800), "gray"), Image.new("RGB", (800, 1200), "gray")]
    results = list(Detector(backend, batch_size=8).detect_many(
        images, ["cat", "dog"], per_class=True, tiles=Tiling((2, 2), overlap=0.25)))
    assert len(backend.sent) == 16 and max(backend.batches) == 8
    for image, result in zip(images, results, strict=True):
        assert len(result.requests) == 8 and (result.width, result.height) == image.size
        tiles = Tiling((2, 2), overlap=0.25).tiles(image.size, None)
        assert [tuple(r["tile"]) for r in result.requests[::2]] == tiles
        # The static model answers the middle half of each tile: four boxes per class.
        assert len(result.boxes) == 8
        for box in result.boxes:
            x0, y0, x1, y1 = box.attributes["tile"]
            assert x0 <= box.bbox[0] < box.bbox[2] <= x1
            assert y0 <= box.bbox[1] < box.bbox[3] <= y1
            w = x1 - x0
            assert abs(box.bbox[0] - (x0 + w / 4)) <= w / 100 + 1


def test_a_failed_tile_fails_the_image_and_names_the_tile():
    backend = Recording("qwen2.5-vl", fail_widths=frozenset({655}))
    result = next(Detector(backend).detect_many(
        [Image.new("RGB", (1200, 800), "gray")], ["cat"], tiles=Tiling((2, 1), overlap=1 / 6)))
    # 2 tiles of 655 pixels: both fail; the image is an error naming the first tile.
    assert result.error and "tile 0,0,655,800" in result.error and not result.boxes


def test_label_records_per_class_in_run_json_and_in_the_record(tmp_path):
    from grounding import RunDir, label

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (320, 240), "gray").save(images / "a.png")
    run = RunDir(tmp_path / "run")
    label(Detector(StaticBackend("deepseek-vl2")), Query.make(["cat", "dog"]), images, run)
    config = run.config()
    assert config["per_class"] is True
    assert config["prompt"] == [
        "<|grounding|>Locate <|ref|>cat<|/ref|> in the given image.",
        "<|grounding|>Locate <|ref|>dog<|/ref|> in the given image."]
    record = json.loads(run.predictions.read_text())
    assert [r["class"] for r in record["requests"]] == ["cat", "dog"]
    assert [d["label"] for d in record["detections"]] == ["cat", "dog"]


def test_cli_per_class_needs_classes(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    out = CliRunner().invoke(app, ["detect", str(image), "--prompt", "the red car",
                                   "--per-class", "--backend", "openai", "--base-url",
                                   "http://127.0.0.1:9/v1", "--model", "m", "--dialect",
                                   "qwen2.5-vl"])
    assert out.exit_code == 2 and "needs classes" in out.output


def test_tiles_on_the_tiny_checkpoint_batch_like_one_at_a_time():
    """The real transformers path: each tile in its own frame, batched with the other
    images' tiles, the same answers as one tile at a time."""
    from grounding.backends.local import LocalBackend
    from grounding.testing import tiny_checkpoint

    backend = LocalBackend(str(tiny_checkpoint("qwen2.5-vl")), max_new_tokens=6,
                           max_pixels=64 * 28 * 28)
    images = [Image.new("RGB", (900, 500), (200, 30, 30)), Image.new("RGB", (500, 900), "navy")]
    tiling = Tiling("auto")
    batched = list(Detector(backend, batch_size=8).detect_many(images, ["cat"], tiles=tiling))
    alone = [Detector(backend, batch_size=1).detect(im, ["cat"], tiles=tiling) for im in images]
    for image, b, a in zip(images, batched, alone, strict=True):
        tiles = tiling.tiles(image.size, backend.max_pixels)
        assert len(tiles) > 1 and len(b.requests) == len(tiles)
        for request, tile in zip(b.requests, tiles, strict=True):
            assert tuple(request["tile"]) == tile
            assert tuple(request["input_size"]) == backend.frame((tile[2] - tile[0],
                                                                  tile[3] - tile[1]))
        assert [r["raw"] for r in b.requests] == [r["raw"] for r in a.requests]


@pytest.mark.parametrize("dialect", ["qwen2-vl", "deepseek-vl2", "qwen-vl"])
def test_label_on_a_model_that_grounds_one_reference_finds_every_class(tmp_path, dialect):
    """A server that, like these models, grounds only the first thing a prompt names:
    by default each class is its own request and every class is found; joined, only the
    first class comes back."""
    from grounding.testing.loopback import LoopbackServer, scene_handler
    from grounding.testing.scenes import scene

    s = scene(448, 448, [("red box", (40, 40, 140, 140)), ("green box", (200, 60, 330, 170)),
                         ("blue box", (80, 250, 260, 400))])
    images = tmp_path / "images"
    images.mkdir()
    s.image.save(images / "a.png")
    runner = CliRunner()
    with LoopbackServer(handler=scene_handler(dialect, min_size=4, first_only=True)) as server:
        common = ["label", str(images), "--classes", "red box,green box,blue box",
                  "--backend", "openai", "--base-url", server.base_url, "--model", "m",
                  "--dialect", dialect]
        out = runner.invoke(app, [*common, "--out", str(tmp_path / "split")])
        assert out.exit_code == 0, out.output
        assert len(server.completions) == 3
        out = runner.invoke(app, [*common, "--out", str(tmp_path / "joined"),
                                  "--no-per-class"])
        assert out.exit_code == 0, out.output
    split = json.loads((tmp_path / "split" / "predictions.jsonl").read_text())
    joined = json.loads((tmp_path / "joined" / "predictions.jsonl").read_text())
    assert sorted(d["label"] for d in split["detections"]) == ["blue box", "green box",
                                                               "red box"]
    assert [r["class"] for r in split["requests"]] == ["red box", "green box", "blue box"]
    for d in split["detections"]:
        truth = next(o.box for o in s.objects if o.label == d["label"])
        assert max(abs(a - b) for a, b in zip(d["bbox"], truth, strict=True)) <= 2
    assert [d["label"] for d in joined["detections"]] == ["red box"]
    assert json.loads((tmp_path / "split" / "run.json").read_text())["per_class"] is True
    assert json.loads((tmp_path / "joined" / "run.json").read_text())["per_class"] is False
