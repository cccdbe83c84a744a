"""Tiles: the grid, the auto grid, and boxes found in tiles landing exactly on the object
in the whole (EXIF-upright) image, fused across tile borders, kept once across overlaps."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding import Detector, Tiling
from grounding.backends.remote import OpenAIBackend
from grounding.cli import app
from grounding.core.tiles import auto_grid, cut_sides, fuse_groups, grid_tiles
from grounding.testing.loopback import LoopbackServer, grounding_handler


@pytest.mark.parametrize("size, cols, rows, overlap", [
    ((4032, 3024), 3, 3, 0.2), ((1000, 700), 4, 1, 0.0), ((999, 1001), 5, 7, 0.5),
    ((300, 200), 1, 1, 0.2)])
def test_grid_covers_the_image_with_equal_overlapping_tiles(size, cols, rows, overlap):
    tiles = grid_tiles(size, cols, rows, overlap)
    assert len(tiles) == cols * rows
    assert len({(t[2] - t[0], t[3] - t[1]) for t in tiles}) == 1  # one tile size
    covered = np.zeros(size[::-1], dtype=bool)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    w = tiles[0][2] - tiles[0][0]
    for a, b in itertools.pairwise(tiles[:cols]):
        assert a[2] - b[0] >= overlap * w - 1  # neighbours share at least the overlap


def test_auto_grid_fits_the_budget_with_reasonable_tiles():
    budget = 1280 * 28 * 28
    assert auto_grid((800, 600), budget) == (1, 1)
    assert auto_grid((4032, 3024), None) == (1, 1)
    for size in [(4032, 3024), (3024, 4032), (1920, 1080), (10000, 1000), (8000, 8000)]:
        tiles = Tiling().tiles(size, budget)
        w, h = tiles[0][2] - tiles[0][0], tiles[0][3] - tiles[0][1]
        assert w * h <= budget and max(w / h, h / w) <= 2, (size, w, h)
    big = Tiling().tiles((4032, 3024), budget)
    assert len(big) < len(Tiling().tiles((4032, 3024), budget // 2))


@pytest.mark.parametrize("text", ["3", "3x", "0x2", "axb", "100x1"])
def test_a_malformed_grid_is_one_line(text):
    with pytest.raises(ValueError, match=r"COLSxROWS|1x1 to 64x64"):
        Tiling.parse(text)
    out = CliRunner().invoke(app, ["detect", "x.jpg", "--classes", "a", "--tiles", text])
    assert out.exit_code == 2 and "--tiles" in out.output


@pytest.mark.parametrize("flags", [["--tiles-with-full"], ["--tile-overlap", "0.3"]])
def test_tile_settings_need_tiles(flags):
    out = CliRunner().invoke(app, ["detect", "x.jpg", "--classes", "a", *flags])
    assert out.exit_code == 2 and f"{flags[0]} needs --tiles" in " ".join(out.output.split())


def test_pieces_cut_by_a_border_are_one_object_and_neighbours_stay_two():
    size = (200, 100)
    left, right = (0, 0, 120, 100), (80, 0, 200, 100)
    # One object from x=50 to x=150: the left tile sees 50..120, the right 80..150.
    pieces = np.array([[50, 10, 120, 60], [80, 10, 150, 60]], dtype=float)
    assert cut_sides(pieces[0], left, size) and cut_sides(pieces[1], right, size)
    assert fuse_groups(pieces, [left, right], ["a", "a"], size) == [[0, 1]]
    assert fuse_groups(pieces, [left, right], ["a", "b"], size) == [[0], [1]]
    # Two objects side by side in the overlap, one seen by each tile.
    two = np.array([[82, 10, 99, 60], [101, 10, 118, 60]], dtype=float)
    assert fuse_groups(two, [left, right], ["a", "a"], size) == [[0], [1]]


def red_image(size, box) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((255, 0, 0), box)
    return image


def backend(server, dialect, max_pixels):
    return OpenAIBackend("loopback-model", base_url=server.base_url, dialect=dialect,
                         max_pixels=max_pixels, concurrency=4, logprobs=False)


@pytest.mark.parametrize("dialect", ["qwen2.5-vl", "qwen3-vl", "deepseek-vl2"])
def test_a_box_across_a_tile_border_is_fused_exactly(dialect):
    truth = (400, 300, 1000, 600)  # cut by borders: no tile of the 3x3 grid sees it whole
    image = red_image((1600, 1200), truth)
    with LoopbackServer(handler=grounding_handler(dialect)) as server:
        result = Detector(backend(server, dialect, 400 * 400)).detect(
            image, ["red box"], tiles="3x3")
    assert len(result.boxes) == 1, result.boxes
    box = result.boxes[0]
    assert np.allclose(box.bbox, truth, atol=1.5), box.bbox
    assert len(box.attributes["tiles"]) >= 2 and "tile" not in box.attributes
    assert result.dropped.get("fused", 0) == len(box.attributes["tiles"]) - 1
    assert len(result.requests) == 9 and result.raw == "" and result.input_size is None
    assert {tuple(r["tile"]) for r in result.requests} == set(
        Tiling((3, 3)).tiles((1600, 1200), None))
    record = json.loads(result.to_json())
    assert record["requests"][0]["raw"] and record["requests"][0]["input_size"]


def test_an_object_seen_whole_by_two_tiles_is_kept_once():
    grid = Tiling((2, 1), overlap=0.5).tiles((1000, 400), None)  # 0..667 and 333..1000
    assert grid == [(0, 0, 667, 400), (333, 0, 1000, 400)]
    truth = (450, 100, 550, 200)  # in the overlap: both tiles see it whole
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        result = Detector(backend(server, "qwen2.5-vl", 1000 * 1000)).detect(
            red_image((1000, 400), truth), ["red box"], tiles=Tiling((2, 1), overlap=0.5))
    assert len(result.boxes) == 1
    assert np.allclose(result.boxes[0].bbox, truth, atol=1.0), result.boxes[0].bbox
    assert result.boxes[0].attributes["tile"] == [0, 0, 667, 400]  # the first tile's view
    assert result.dropped == {"duplicate": 1}


def test_small_object_found_exactly_with_tiles_and_blurred_without(tmp_path):
    """A 12x12 object in a 4032x3024 photo, EXIF-rotated: the model sees it at full
    resolution in a tile and lands on it as a person sees the image."""
    truth = (2000, 1500, 2012, 1512)  # in the displayed (upright) frame
    upright = red_image((4032, 3024), truth)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # displayed = stored rotated back
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "photo.jpg"
    stored.save(path, quality=98, exif=exif)
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        det = Detector(backend(server, "qwen2.5-vl", 1280 * 28 * 28))
        tiled = det.detect(path, ["red box"], tiles="auto")
        whole = det.detect(path, ["red box"])
    assert (tiled.width, tiled.height) == (4032, 3024)
    assert len(tiled.boxes) == 1
    assert np.allclose(tiled.boxes[0].bbox, truth, atol=1.5), tiled.boxes[0].bbox
    assert len(tiled.requests) > 1
    err_tiled = np.abs(np.subtract(tiled.boxes[0].bbox, truth)).max()
    err_whole = (np.abs(np.subtract(whole.boxes[0].bbox, truth)).max() if whole.boxes
                 else np.inf)
    assert err_tiled < err_whole


def test_tiles_with_full_asks_the_whole_image_too_and_keeps_a_large_object_once():
    truth = (100, 100, 1500, 1100)  # larger than any tile
    with LoopbackServer(handler=grounding_handler("qwen3-vl")) as server:
        result = Detector(backend(server, "qwen3-vl", 400 * 400)).detect(
            red_image((1600, 1200), truth), ["red box"],
            tiles=Tiling((2, 2), with_full=True))
    assert len(result.requests) == 5 and result.requests[-1]["tile"] is None
    assert len(result.boxes) == 1
    assert np.allclose(result.boxes[0].bbox, truth, atol=4), result.boxes[0].bbox


def test_label_records_the_tiling_and_another_tiling_is_another_run(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    red_image((1600, 1200), (700, 500, 900, 650)).save(images / "a.png")
    run = tmp_path / "run"
    runner = CliRunner()
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        common = ["label", str(images), "--out", str(run), "--classes", "red box",
                  "--backend", "openai", "--base-url", server.base_url, "--model", "m",
                  "--dialect", "qwen2.5-vl", "--max-pixels", str(400 * 400)]
        out = runner.invoke(app, [*common, "--tiles", "3x3", "--tile-overlap", "0.25"])
        assert out.exit_code == 0, out.output
        again = runner.invoke(app, [*common, "--tiles", "2x2", "--tile-overlap", "0.25"])
    config = json.loads((run / "run.json").read_text())
    assert (config["tiles"], config["tile_overlap"], config["tiles_with_full"]) == (
        "3x3", 0.25, False)
    assert again.exit_code == 2 and "tiles: '3x3' -> '2x2'" in again.output
    record = json.loads((run / "predictions.jsonl").read_text())
    assert len(record["requests"]) == 9 and len(record["detections"]) == 1


def test_auto_tiles_know_a_budget_for_every_dialect():
    """DeepSeek-VL2 is sent images as they are: auto still tiles a large one."""
    from grounding.pipeline.parts import UNKNOWN_BUDGET, budget
    from grounding.testing import StaticBackend

    assert budget(StaticBackend("deepseek-vl2"), (3000, 2000)) == UNKNOWN_BUDGET
    assert budget(StaticBackend("qwen-vl"), (3000, 2000)) == 448 * 448
    assert len(Tiling().tiles((3000, 2000), budget(StaticBackend("deepseek-vl2"),
                                                       (3000, 2000)))) > 1
