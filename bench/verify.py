"""What --verify costs: detection alone vs verification of K boxes per image, per box.

    python bench/verify.py                                 # tiny random checkpoint on CPU
    python bench/verify.py --model Qwen/Qwen2.5-VL-7B-Instruct --images 32 --boxes 8   # GPU

Detection runs through Detector.detect_many as `grounding detect` does. Verification is
timed on results holding exactly K boxes per image (built with result_from_text, since a
random-weight model finds none), all boxes of all images verified in one go in batches of
--batch-size: one crop and one generated token per box.

With the tiny checkpoint the numbers measure grounding's own overhead and the transformers
path, not a real model; on a GPU with real weights they are the figure that matters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from grounding import result_from_text
from grounding.backends.local import LocalBackend
from grounding.pipeline.crops import crop_with_context
from grounding.pipeline.detector import Detector
from grounding.pipeline.verify import verify_many


def images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    w, h = size
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def with_boxes(backend, image: Image.Image, k: int):
    """A result with k boxes on a grid, as the model would have written them."""
    frame = backend.frame(image.size)
    scale = (backend.dialect.norm, backend.dialect.norm) if backend.dialect.is_relative else frame
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    objects = []
    for i in range(k):
        r, c = divmod(i, cols)
        box = [round((c + 0.1) / cols * scale[0]), round((r + 0.1) / rows * scale[1]),
               round((c + 0.9) / cols * scale[0]), round((r + 0.9) / rows * scale[1])]
        objects.append({"bbox_2d": box, "label": ("person", "car")[i % 2]})
    result = result_from_text(json.dumps(objects), backend.dialect, image_size=image.size,
                              input_size=frame)
    assert len(result.boxes) == k
    return result.attach(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or directory (default: tiny)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=4, help="boxes per image to verify")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for detection")
    args = parser.parse_args()
    if args.model is None:
        from grounding.testing import tiny_checkpoint

        args.model = str(tiny_checkpoint("qwen2.5-vl"))
    size = tuple(int(v) for v in args.size.lower().split("x"))
    backend = LocalBackend(args.model, max_new_tokens=args.max_new_tokens)
    detector = Detector(backend, batch_size=args.batch_size)
    imgs = images(args.images, size)
    forced = [with_boxes(backend, im, args.boxes) for im in imgs]

    list(detector.detect_many(imgs[:2], ["person", "car"]))  # warm-up
    verify_many(forced[:1], None, backend, batch_size=args.batch_size)

    t0 = time.perf_counter()
    detected = list(detector.detect_many(imgs, ["person", "car"]))
    detect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    verified = verify_many(forced, None, backend, threshold=0.0, batch_size=args.batch_size)
    verify_s = time.perf_counter() - t0

    n, k = args.images, args.boxes
    found = sum(len(r.boxes) for r in detected)
    scored = sum(b.attributes.get("verify_score") is not None for r in verified for b in r.boxes)
    console = Console(width=120)
    console.print(f"model {backend.model} ({backend.dialect.name}) on {backend.device}, "
                  f"{n} images {size[0]}x{size[1]}, detection max_new_tokens "
                  f"{args.max_new_tokens}, batch {args.batch_size}, "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    crop, _ = crop_with_context(forced[0]._image, forced[0].boxes[0])
    crop_frame = backend.frame(crop.size)
    console.print(f"verification: {n * k} crops ({crop.width}x{crop.height}, model frame "
                  f"{crop_frame[0]}x{crop_frame[1]}), 1 new token each; scores read: {scored} "
                  f"of {n * k}; detection found {found} boxes")
    table = Table(title="What --verify costs")
    for col in ("stage", "images", "boxes", "seconds", "ms per image", "ms per box"):
        table.add_column(col, justify="right")
    total = detect_s + verify_s
    table.add_row("detection", str(n), "-", f"{detect_s:.2f}", f"{1000 * detect_s / n:.0f}", "-")
    table.add_row("verification", str(n), str(n * k), f"{verify_s:.2f}",
                  f"{1000 * verify_s / n:.0f}", f"{1000 * verify_s / (n * k):.1f}")
    table.add_row("detection + verification", str(n), str(n * k), f"{total:.2f}",
                  f"{1000 * total / n:.0f}", "-")
    console.print(table)
    console.print(f"verification adds {100 * verify_s / detect_s:.0f}% to detection "
                  f"({k} boxes per image)")


if __name__ == "__main__":
    main()
