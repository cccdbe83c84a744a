"""Local backend throughput: images/s at batch 1 and batch 8 on the same images, and where
the time goes (preprocess, generate, decode, parse).

    python bench/local.py                          # tiny random checkpoint on CPU
    python bench/local.py --model Qwen/Qwen2.5-VL-7B-Instruct --images 32   # on a GPU

With the tiny checkpoint the numbers measure grounding's own overhead and the transformers
path, not a real model; on a GPU with real weights they are the figure that matters.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from grounding.backends.local import LocalBackend
from grounding.detector import Detector


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (800, 600), (1024, 768)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for w, h in (sizes[i % len(sizes)] for i in range(n))]


def run(detector: Detector, imgs, batch: int) -> dict[str, float]:
    t0 = time.perf_counter()
    results = list(detector.detect_many(imgs, ["person", "car"], batch_size=batch))
    wall = time.perf_counter() - t0
    split = {k: sum(r.generation.timings[k] for r in results)
             for k in ("preprocess", "generate", "decode")}
    split["parse+rest"] = max(0.0, wall - sum(split.values()))
    return {"wall": wall, "images/s": len(imgs) / wall, **split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or directory (default: tiny)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    if args.model is None:
        from grounding.testing import tiny_checkpoint

        args.model = str(tiny_checkpoint("qwen2.5-vl"))
    backend = LocalBackend(args.model, max_new_tokens=args.max_new_tokens)
    detector = Detector(backend)
    imgs = images(args.images)
    run(detector, imgs[:2], 2)  # warm-up
    rows = {b: run(detector, imgs, b) for b in args.batches}
    console = Console(width=120)
    console.print(f"model {backend.model} ({backend.dialect.name}) on {backend.device}, "
                  f"{args.images} images, max_new_tokens {args.max_new_tokens}, "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    table = Table(title="Local backend throughput")
    for col in ("batch", "images/s", "vs batch 1", "preprocess s", "generate s", "decode s",
                "parse+rest s", "wall s"):
        table.add_column(col, justify="right")
    base = rows[args.batches[0]]["images/s"]
    for b, r in rows.items():
        table.add_row(str(b), f"{r['images/s']:.2f}", f"{r['images/s'] / base:.2f}x",
                      f"{r['preprocess']:.2f}", f"{r['generate']:.2f}", f"{r['decode']:.2f}",
                      f"{r['parse+rest']:.2f}", f"{r['wall']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
