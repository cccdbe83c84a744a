"""The overlay (Result.annotate): points are drawn so that they can be seen and read, and
it shows the same labels as the record and the exports."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv
from PIL import Image

import grounding  # noqa: F401  (registers Result.annotate)
from grounding import Point, Result, result_from_text

GREY = (128, 128, 128)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.any(before != after, axis=2)


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return (xs + 0.5 - centre[0]) ** 2 + (ys + 0.5 - centre[1]) ** 2 <= radius ** 2


@pytest.mark.parametrize("size", [(1600, 1200), (120, 90)])
def test_a_point_is_a_dot_sized_to_the_image_with_an_outline_and_its_label(size):
    w, h = size
    centre = (w * 0.4, h * 0.5)
    result = Result(points=[Point(centre, "nose")], width=w, height=h)
    image = Image.new("RGB", size, GREY)
    before = np.asarray(image)
    after = np.asarray(result.annotate(image))
    changed = _changed(before, after)
    # The marker covers every pixel within 1/100 of the shorter side (at least 4 px) of
    # the point: 452 pixels on the large image, where the old dot was 8 px wide.
    radius = max(4, min(size) / 100)
    disc = _disc(changed.shape, centre, radius)
    assert changed[disc].all(), f"{(~changed[disc]).sum()} pixels of the marker unchanged"
    assert disc.sum() >= (400 if w > 1000 else 45)
    # A contrasting outline: both near-white and near-black pixels around the dot.
    ring = _disc(changed.shape, centre, radius * 2) & ~_disc(changed.shape, centre, radius / 2)
    around = after[ring].astype(int)
    assert (around.min(axis=1) > 230).sum() >= 4  # white
    assert (around.max(axis=1) < 40).sum() >= 4  # black
    # The label: pixels changed beside the point, right of the marker, none far above it.
    right = changed[int(centre[1]) - 2: int(centre[1]) + 3,
                    int(centre[0] + 2 * radius): int(centre[0] + 2 * radius) + 20]
    assert right.sum() >= 20
    far = changed.copy()
    far[_disc(changed.shape, centre, 2 * radius + 60 + w / 8)] = False
    assert not far.any()  # nothing drawn away from the point


def test_a_point_at_the_corner_stays_visible_and_labelled():
    result = Result(points=[Point((119.5, 89.5), "corner")], width=120, height=90)
    image = Image.new("RGB", (120, 90), GREY)
    changed = _changed(np.asarray(image), np.asarray(result.annotate(image)))
    assert changed[86:90, 116:120].all()  # the dot is on top of its tag
    assert changed[60:90, 40:110].sum() >= 100  # the tag, pushed onto the image


def test_overlay_shows_the_class_not_the_prompt_phrase(monkeypatch):
    """With an ontology the overlay, the record and the exports all say the class."""
    seen: list[list[str]] = []
    original = sv.LabelAnnotator.annotate

    def spy(self, scene, detections, labels=None, **kwargs):
        seen.append(list(labels))
        return original(self, scene, detections, labels=labels, **kwargs)

    monkeypatch.setattr(sv.LabelAnnotator, "annotate", spy)
    text = ('[{"bbox_2d": [10, 10, 50, 50], "label": "pedestrian"}, '
            '{"bbox_2d": [60, 10, 90, 50], "label": "lamp post"}]')
    result = result_from_text(text, "qwen2.5-vl", image_size=(100, 80), input_size=(100, 80),
                              classes={"pedestrian": "person"})
    points = result_from_text('[{"point_2d": [20, 30], "label": "pedestrian"}]', "qwen2.5-vl",
                              image_size=(100, 80), input_size=(100, 80),
                              classes={"pedestrian": "person"})
    result.annotate(Image.new("RGB", (100, 80), GREY))
    points.annotate(Image.new("RGB", (100, 80), GREY))
    assert seen == [["person", "lamp post"], ["person"]]
    assert result.to_record()["detections"][0]["label"] == "person"


def test_points_and_boxes_share_colours_by_label_without_classes():
    text = ('[{"bbox_2d": [10, 10, 50, 50], "label": "cat"}, {"point_2d": [70, 30], '
            '"label": "dog"}, {"point_2d": [80, 60], "label": "cat"}]')
    result = result_from_text(text, "qwen2.5-vl", image_size=(100, 80), input_size=(100, 80))
    assert result.class_ids(result.boxes) == [0]
    assert result.class_ids(result.points) == [1, 0]
    image = np.asarray(result.annotate(Image.new("RGB", (100, 80), GREY)))
    palette = sv.ColorPalette.DEFAULT
    assert tuple(image[60, 80]) == palette.by_idx(0).as_rgb()  # the cat point: cat's colour
    assert tuple(image[30, 70]) == palette.by_idx(1).as_rgb()
