"""Draw a Result on its image with supervision's annotators."""

from __future__ import annotations

import numpy as np
from PIL import Image

from grounding.core.result import Result, register_view


@register_view("annotate")
def annotate(image: Image.Image, result: Result) -> Image.Image:
    """Boxes, labels and points drawn on a copy of the (upright RGB) image."""
    import supervision as sv

    if result.image_size is not None and image.size != result.image_size:
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} but the result is for "
                         f"{result.width}x{result.height}")
    scene = np.array(image.convert("RGB"))
    thickness = max(1, round(min(image.size) / 320))
    text_scale = max(0.4, min(image.size) / 1200)
    detections = result.to_detections()
    if len(detections):
        labels = [name or "?" for name in detections.data["class_name"]]
        scene = sv.BoxAnnotator(thickness=thickness).annotate(scene, detections)
        scene = sv.LabelAnnotator(text_scale=text_scale, text_thickness=thickness,
                                  text_position=sv.Position.TOP_LEFT,
                                  smart_position=True).annotate(
            scene, detections, labels=labels)
    if result.points:
        xy = np.array([[p.point] for p in result.points], dtype=np.float32)
        keypoints = sv.KeyPoints(xy=xy)
        scene = sv.VertexAnnotator(color=sv.Color.RED, radius=max(3, 2 * thickness)).annotate(
            scene, keypoints)
    return Image.fromarray(scene)
