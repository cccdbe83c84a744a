"""Draw a Result on its image with supervision's annotators.

Boxes: supervision's box and label annotators, coloured by class. Points: a filled dot in
the class's colour with a white ring and a black rim (visible on light and dark images
alike), its radius a fraction of the image's shorter side, and the label in a tag beside
it; on a large photo a point is as easy to see as a box.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from grounding.core.result import Result, register_view


def point_radius(size: tuple[int, int]) -> int:
    """Radius in pixels of a point's dot (ring included, rim excluded): 1/80 of the
    image's shorter side, at least 4."""
    return max(4, round(min(size) / 80))


@register_view("annotate")
def annotate(image: Image.Image, result: Result) -> Image.Image:
    """Boxes (over their masks, when segmented), labels and points drawn on a copy of the
    (upright RGB) image."""
    import supervision as sv

    if result.image_size is not None and image.size != result.image_size:
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} but the result is for "
                         f"{result.width}x{result.height}")
    # supervision draws with OpenCV on BGR arrays: its palette's colours come out right.
    scene = np.ascontiguousarray(np.array(image.convert("RGB"))[:, :, ::-1])
    thickness = max(1, round(min(image.size) / 320))
    text_scale = max(0.4, min(image.size) / 1200)
    detections = result.to_detections()
    if len(detections):
        labels = [name or "?" for name in detections.data["class_name"]]
        if detections.mask is not None:  # masks under the boxes, boxes stay readable
            scene = sv.MaskAnnotator(opacity=0.45).annotate(scene, detections)
        scene = sv.BoxAnnotator(thickness=thickness).annotate(scene, detections)
        scene = sv.LabelAnnotator(text_scale=text_scale, text_thickness=thickness,
                                  text_position=sv.Position.TOP_LEFT,
                                  smart_position=True).annotate(
            scene, detections, labels=labels)
    if result.points:
        scene = _points(scene, result, thickness, text_scale)
    return Image.fromarray(np.ascontiguousarray(scene[:, :, ::-1]))


def _points(scene: np.ndarray, result: Result, thickness: int, text_scale: float) -> np.ndarray:
    """Each point as a dot (class colour, white ring, black rim) with its label beside it.

    supervision draws at detections' anchors, so each point becomes a square box around
    its dot: DotAnnotator fills the centre, LabelAnnotator sets the tag on the box's
    right edge (smart_position keeps tags on the image and apart)."""
    import supervision as sv

    height, width = scene.shape[:2]
    radius = point_radius((width, height))
    ring = max(1, round(radius / 3))
    rim = ring
    reach = radius + rim
    xy = result.points_xy
    dots = sv.Detections(
        xyxy=np.concatenate([xy - reach, xy + reach], axis=1).astype(np.float32),
        class_id=np.array(result.class_ids(result.points), dtype=int))
    labels = [p.label or "?" for p in result.points]
    scene = sv.LabelAnnotator(text_scale=text_scale, text_thickness=thickness,
                              text_padding=max(3, 2 * thickness),
                              text_position=sv.Position.CENTER_RIGHT,
                              text_offset=(reach, 0), smart_position=True).annotate(
        scene, dots, labels=labels)
    # The dots last: a tag pushed back onto the image at an edge never hides its point.
    scene = sv.DotAnnotator(color=sv.Color.BLACK, radius=reach).annotate(scene, dots)
    return sv.DotAnnotator(radius=radius, outline_thickness=ring,
                           outline_color=sv.Color.WHITE).annotate(scene, dots)
