"""An image or a box too thin for the model (aspect ratio over 200, which Qwen's
smart_resize refuses) is that image's or that box's problem: an error record, never a
crashed detect, label or verify run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from grounding.backends.remote.client import OpenAIBackend
from grounding.core.geometry import MAX_ASPECT_RATIO, model_frame
from grounding.core.result import Box, Result
from grounding.io.records import read_jsonl
from grounding.pipeline.crops import crop_with_context
from grounding.pipeline.detector import Detector, Query
from grounding.pipeline.verify import verify_many
from grounding.runs.labeling import label
from grounding.runs.rundir import RunDir
from grounding.testing import StaticBackend, tiny_checkpoint
from grounding.testing.loopback import LoopbackServer, fixed_handler


def picture(width: int, height: int, value: int = 90) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), value, np.uint8))


def check_thin_is_an_error(results: list[Result], names: list[str]) -> None:
    assert [r.image for r in results] == names
    ok, thin, ok2 = results
    assert ok.error is None and ok2.error is None
    assert ok.width == 40 and ok2.width == 36
    assert thin.error and "aspect ratio" in thin.error and "300x1" in thin.error
    assert (thin.width, thin.height) == (300, 1)
    assert not thin.boxes


@pytest.fixture
def images(tmp_path) -> list[str]:
    paths = []
    for name, (w, h) in (("a.png", (40, 30)), ("b_thin.png", (300, 1)), ("c.png", (36, 30))):
        picture(w, h).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_too_thin_image_is_its_own_error_with_static_backend(images):
    for batch_size in (1, 2, 3):
        det = Detector(StaticBackend(label="cat"), batch_size=batch_size)
        check_thin_is_an_error(list(det.detect_many(images, ["cat"])), images)
    # in-memory images take the same path
    pics = [picture(40, 30), picture(300, 1), picture(36, 30)]
    results = list(Detector(StaticBackend(), batch_size=4).detect_many(pics, ["cat"]))
    check_thin_is_an_error(results, [r.image for r in results])


def test_too_thin_image_is_its_own_error_with_the_tiny_checkpoint(images):
    det = Detector(str(tiny_checkpoint("qwen2.5-vl")), max_new_tokens=4, batch_size=2)
    check_thin_is_an_error(list(det.detect_many(images, ["cat"])), images)


def test_too_thin_image_is_its_own_error_on_a_server(images):
    with LoopbackServer(handler=fixed_handler()) as server:
        backend = OpenAIBackend("loopback-model", base_url=server.base_url,
                                dialect="qwen2.5-vl", timeout=10.0)
        try:
            check_thin_is_an_error(list(Detector(backend).detect_many(images, ["cat"])),
                                   images)
        finally:
            backend.close()


def test_label_with_a_too_thin_image_finishes_and_resumes(tmp_path, images):
    folder = tmp_path
    for attempt in range(3):  # the first run, a resume, a retry of the errors
        det = Detector(StaticBackend(label="cat"), batch_size=2)
        summary = label(det, Query.make(["cat"]), folder, RunDir(tmp_path / "run"),
                        retry_errors=attempt == 2)
        assert summary["errors"] == 1, attempt
    run = RunDir(tmp_path / "run")
    assert sorted(r["image"] for r in run.records()) == ["a.png", "c.png"]
    errors = list(read_jsonl(run.errors))
    assert {e["image"] for e in errors} == {"b_thin.png"}
    assert all("aspect ratio" in e["error"] for e in errors)


# ------------------------------------------------------------------ verification crops


@pytest.mark.parametrize(("size", "box"), [
    ((6000, 28), (0, 0, 6000, 28)),      # a box spanning a strip too thin for the model
    ((28, 6000), (0, 0, 28, 6000)),      # the same, standing
    ((6000, 400), (0, 100, 6000, 120)),  # a thin box in an ordinary image
    ((400, 9000), (190, 0, 192, 9000)),
    ((300, 1), (0, 0, 300, 1)),
])
def test_crop_of_a_thin_box_has_a_ratio_the_model_takes(size, box):
    image = Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (size[1], size[0], 3), np.uint8))
    crop, (x0, y0, x1, y1) = crop_with_context(image, box)
    assert crop.size == (x1 - x0, y1 - y0)
    assert max(crop.size) / min(crop.size) <= MAX_ASPECT_RATIO
    model_frame("qwen2.5-vl", *crop.size)  # does not raise
    # the whole box is in the crop, and crop pixels are image pixels at (x0, y0) + (u, v)
    assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]
    a, c = np.asarray(image), np.asarray(crop)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, size[0]), min(y1, size[1])
    inside = c[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
    assert np.array_equal(inside, a[iy0:iy1, ix0:ix1])
    assert c.sum() == inside.sum()  # what lies beyond the image is black padding
    # the short side grew no more than needed
    short = min(x1 - x0, y1 - y0)
    assert short <= max(math.ceil(max(crop.size) / MAX_ASPECT_RATIO), 28,
                        math.ceil(1.5 * min(box[2] - box[0], box[3] - box[1])) + 1)


@pytest.mark.parametrize("size", [(6000, 28), (28, 6000)])
def test_verify_many_of_a_box_spanning_a_thin_image(size):
    image = picture(*size)
    result = Result(boxes=[Box((0.0, 0.0, float(size[0]), float(size[1])), label="rail"),
                           Box((10.0, 5.0, 20.0, 15.0) if size[0] > size[1]
                               else (5.0, 10.0, 15.0, 20.0), label="bolt")],
                    image="strip.png", width=size[0], height=size[1])
    backend = StaticBackend()
    out = verify_many([result], [image], backend, threshold=0.0)
    assert [b.label for b in out[0].boxes] == ["rail", "bolt"]
    for box in out[0].boxes:
        assert "verify_score" in box.attributes
        assert "verify_error" not in box.attributes
