"""Masks through the pipeline: every kept box segmented on the upright image, masks in
the displayed frame on EXIF-rotated files, batches of images, failures recorded per
image, records, overlays and run.json; and the real SAM 2 path on the tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding import Detector, Query, RunDir, label
from grounding.cli import app
from grounding.core.masks import decode
from grounding.testing import StaticBackend, StaticSegmenter
from grounding.testing.loopback import LoopbackServer, grounding_handler


def red_image(size, box) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((255, 0, 0), box)
    return image


def test_masks_land_on_the_object_in_an_exif_rotated_photo(tmp_path):
    truth = (300, 100, 500, 180)  # in the displayed (upright) frame
    stored = red_image((640, 480), truth).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    stored.save(path, quality=98, exif=exif)
    from grounding.backends.remote import OpenAIBackend

    segmenter = StaticSegmenter()
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, dialect="qwen2.5-vl")
        try:
            result = Detector(backend, masks=segmenter).detect(path, ["red box"])
        finally:
            backend.close()
    (box,) = result.boxes
    assert box.mask["size"] == [480, 640]  # height, width of the displayed image
    mask = decode(box.mask)
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - truth[0]) <= 1 and abs(xs.max() + 1 - truth[2]) <= 1
    assert abs(ys.min() - truth[1]) <= 1 and abs(ys.max() + 1 - truth[3]) <= 1
    assert box.attributes["mask_score"] == 1.0
    assert box.attributes["mask_area"] == int(mask.sum())
    assert "mask_problem" not in box.attributes
    record = json.loads(result.to_json())
    assert record["detections"][0]["mask"] == box.mask
    overlay = np.asarray(result.annotate(), dtype=int)
    plain = np.asarray(result.attached_image, dtype=int)
    assert np.abs(overlay - plain)[mask].mean() > 10  # the mask is drawn
    assert np.abs(overlay - plain)[~mask].mean() < 5  # and only there (plus outlines)


def test_images_go_in_batches_and_images_without_boxes_are_skipped():
    segmenter = StaticSegmenter()
    backend = StaticBackend("qwen2.5-vl")
    images = [Image.new("RGB", (200 + 10 * i, 150), "gray") for i in range(5)]
    results = list(Detector(backend, batch_size=2, masks=segmenter,
                            min_score=None).detect_many(images, ["object"]))
    assert segmenter.calls == [(2, 2), (2, 2), (1, 1)]
    for image, result in zip(images, results, strict=True):
        assert [b.mask["size"] for b in result.boxes] == [[image.height, image.width]]


def test_a_failing_segmenter_fails_the_image_and_the_run_goes_on(tmp_path):
    class Broken(StaticSegmenter):
        def segment(self, images, boxes):
            if any(im.width == 210 for im in images):
                raise RuntimeError("segmenter exploded")
            return super().segment(images, boxes)

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (200 + 10 * i, 150), "gray").save(images / f"{i}.png")
    run = RunDir(tmp_path / "run")
    summary = label(Detector(StaticBackend(), masks=Broken()), Query.make(["object"]),
                    images, run)
    assert summary["images"] == 2 and summary["errors"] == 1
    (error,) = [json.loads(line) for line in run.errors.read_text().splitlines()]
    assert error["image"] == "1.png" and "segmenter exploded" in error["error"]
    assert run.config()["masks"] == "static-segmenter"
    for record in run.records():
        assert all("mask" in d for d in record["detections"])


def test_mask_model_needs_masks():
    out = CliRunner().invoke(app, ["detect", "x.jpg", "--classes", "a", "--mask-model", "m"])
    assert out.exit_code == 2 and "--mask-model needs --masks" in " ".join(out.output.split())


def test_masks_for_a_finished_run_without_asking_the_detector_again(tmp_path):
    from grounding.runs.masks import add_masks

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (200 + 10 * i, 150), "gray").save(images / f"{i}.png")
    boxes = RunDir(tmp_path / "boxes")
    label(Detector(StaticBackend()), Query.make(["object"]), images, boxes)
    (images / "2.png").unlink()  # an image gone since: an error of the new run
    segmenter = StaticSegmenter()
    out = RunDir(tmp_path / "masks")
    summary = add_masks(boxes, out, segmenter, batch_size=2)
    assert summary["images"] == 2 and summary["errors"] == 1
    before = {r["image"]: r for r in boxes.records()}
    for record in out.records():
        old = before[record["image"]]
        assert [d["bbox"] for d in record["detections"]] == [
            d["bbox"] for d in old["detections"]]
        assert all(d["mask"]["size"] == [old["height"], old["width"]]
                   for d in record["detections"])
    config = out.config()
    assert config["masks"] == "static-segmenter"
    assert config["source_run"] == str(boxes.path.resolve())
    # Again: nothing new to do, nothing written twice.
    add_masks(boxes, out, segmenter)
    assert len(list(out.records())) == 2
    with pytest.raises(Exception, match="new run directory"):
        add_masks(boxes, boxes, segmenter)


def test_label_and_masks_commands_run_sam2_for_real(tmp_path):
    """The real transformers SAM 2 path (tiny random checkpoint) from the command line:
    label --masks, and grounding masks on a box-only run; random weights, so only the
    shapes, the accounting and the records are checked."""
    from grounding.testing.tiny import tiny_sam2

    sam = str(tiny_sam2())
    images = tmp_path / "images"
    images.mkdir()
    red_image((320, 240), (40, 60, 200, 180)).save(images / "a.png")
    red_image((240, 320), (20, 20, 100, 300)).save(images / "b.png")
    runner = CliRunner()
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        common = ["--classes", "red box", "--backend", "openai", "--base-url",
                  server.base_url, "--model", "m", "--dialect", "qwen2.5-vl"]
        out = runner.invoke(app, ["label", str(images), "--out", str(tmp_path / "seg"),
                                  *common, "--masks", "--mask-model", sam])
        assert out.exit_code == 0, out.output
        out = runner.invoke(app, ["label", str(images), "--out", str(tmp_path / "boxes"),
                                  *common])
        assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["masks", str(tmp_path / "boxes"), "--out",
                              str(tmp_path / "later"), "--mask-model", sam])
    assert out.exit_code == 0, out.output
    for run in ("seg", "later"):
        records = {r["image"]: r for r in RunDir(tmp_path / run).records()}
        assert set(records) == {"a.png", "b.png"}
        for record in records.values():
            (d,) = record["detections"]
            assert d["mask"]["size"] == [record["height"], record["width"]]
            assert np.isfinite(d["attributes"]["mask_score"])
            assert d["attributes"]["mask_area"] == int(decode(d["mask"]).sum())
        assert RunDir(tmp_path / run).config()["masks"] == sam
    bad = runner.invoke(app, ["masks", str(tmp_path / "boxes"), "--out",
                              str(tmp_path / "x"), "--mask-model", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and bad.output.count("\n") <= 2 and "--mask-model" in bad.output


def test_a_bad_mask_model_is_one_line_and_exit_2(tmp_path):
    from grounding.testing import tiny_checkpoint

    image = tmp_path / "a.png"
    red_image((64, 48), (10, 10, 30, 30)).save(image)
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl")) as server:
        common = ["--classes", "red box", "--backend", "openai", "--base-url",
                  server.base_url, "--model", "m", "--dialect", "qwen2.5-vl", "--masks"]
        for model in (str(tmp_path / "nope"), str(tiny_checkpoint("qwen2.5-vl"))):
            for command in (["detect", str(image)],
                            ["label", str(tmp_path), "--out", str(tmp_path / "run")]):
                out = CliRunner().invoke(app, [*command, *common, "--mask-model", model])
                assert out.exit_code == 2, out.output
                assert out.output.startswith("error: --mask-model")
                assert "Traceback" not in out.output


def test_yolo_segment_export_of_a_run_without_masks_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), "gray").save(images / "a.png")
    label(Detector(StaticBackend()), Query.make(["object"]), images, RunDir(tmp_path / "r"))
    out = CliRunner().invoke(app, ["export", str(tmp_path / "r"), "--format", "yolo",
                                   "--yolo-task", "segment", "--out", str(tmp_path / "y")])
    assert out.exit_code == 2 and "no box of" in out.output and "grounding masks" in out.output
    assert not (tmp_path / "y").exists()
