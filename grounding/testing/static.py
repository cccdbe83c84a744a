"""A backend with no model, for pipeline tests, benchmarks and offline demos."""

from __future__ import annotations

import time

from grounding.testing.answers import answer_text

__all__ = ["StaticBackend", "StaticSegmenter"]


class StaticBackend:
    """A backend with no model, for pipeline tests, benchmarks and offline demos.

    Answers every request at once (after ``delay`` seconds) with one box covering the
    middle half of the model frame, labelled ``label``, written in the dialect's own
    syntax (:func:`~grounding.testing.answers.answer_text`), so everything after the model
    (parsing, geometry, records, exports) runs for real. Requests whose image width is in
    ``fail_widths`` fail.
    """

    def __init__(self, dialect: str = "qwen2.5-vl", *, label: str = "object",
                 delay: float = 0.0, fail_widths: frozenset[int] = frozenset()) -> None:
        from grounding.core.dialects import get_dialect

        self.dialect = get_dialect(dialect)
        self.model = f"static-{self.dialect.name}"
        self.label = label
        self.delay = delay
        self.fail_widths = fail_widths
        self.max_new_tokens = 64

    def frame(self, image_size: tuple[int, int]) -> tuple[int, int]:
        from grounding.core.geometry import model_frame, resolve_budget

        low, high = resolve_budget(self.dialect)
        return model_frame(self.dialect, *image_size, min_pixels=low, max_pixels=high)

    def generate(self, requests: list) -> list:
        from grounding.backends.base import Generation

        if self.delay:
            time.sleep(self.delay)
        out: list = []
        for request in requests:
            if request.image.width in self.fail_widths:
                out.append(RuntimeError(f"static backend told to fail on width "
                                        f"{request.image.width}"))
                continue
            frame = self.frame(request.image.size)
            w, h = (self.dialect.norm,) * 2 if self.dialect.is_relative else frame
            box = [round(w / 4), round(h / 4), round(3 * w / 4), round(3 * h / 4)]
            out.append(Generation(text=answer_text(self.dialect, box, self.label),
                                  input_size=frame,
                                  timings={"preprocess": 0.0, "generate": 0.0, "decode": 0.0}))
        return out


class StaticSegmenter:
    """A segmenter with no model, for pipeline tests and offline demos: each box's mask
    is the box itself (its pixels, edges rounded to the nearest pixel boundary), with
    score 1.0, so everything after segmentation (records, overlays, exports) runs for
    real and where each mask lands can be checked exactly. Records each call's number
    of images and boxes in ``calls``."""

    def __init__(self, model: str = "static-segmenter") -> None:
        self.model = model
        self.calls: list[tuple[int, int]] = []

    def segment(self, images: list, boxes: list) -> list:
        import numpy as np

        from grounding.backends.segment import MaskResult
        from grounding.core.masks import area, encode, mask_check

        self.calls.append((len(images), sum(len(b) for b in boxes)))
        out = []
        for image, xyxy in zip(images, boxes, strict=True):
            width, height = image.size
            found = []
            for x1, y1, x2, y2 in np.asarray(xyxy, dtype=float).reshape(-1, 4):
                mask = np.zeros((height, width), dtype=bool)
                mask[round(y1):round(y2), round(x1):round(x2)] = True
                rle = encode(mask)
                found.append(MaskResult(rle, 1.0, area(rle),
                                        mask_check(mask, (x1, y1, x2, y2))))
            out.append(found)
        return out
