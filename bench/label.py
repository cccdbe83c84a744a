"""The labelling pipeline itself, without a model: images/s, peak memory, export times.

    python bench/label.py                 # 1,000 and 10,000 images
    python bench/label.py --sizes 1000 100000
    python bench/label.py --masks static  # every box segmented too (a mask per box)
    python bench/label.py --masks tiny --sizes 200 1000   # the real SAM 2 path, tiny

Generates small JPEGs, labels them with grounding's StaticBackend (answers at once, so
what is measured is finding, decoding, resizing, parsing, rescaling and writing records),
then exports COCO, YOLO and Label Studio. Each size runs in a fresh process so its peak
RSS is its own: it must not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:06d}.jpg", quality=80)


def segmenter(kind: str | None):
    """None; the StaticSegmenter (a mask per box, no model: what masks cost the
    pipeline); the tiny random SAM 2 (the real transformers path); or a checkpoint."""
    if not kind:
        return None
    if kind == "static":
        from grounding.testing import StaticSegmenter

        return StaticSegmenter()
    from grounding.backends.segment import SamSegmenter

    if kind == "tiny":
        from grounding.testing.tiny import tiny_sam2

        kind = str(tiny_sam2())
    return SamSegmenter(kind, device="cpu")


def child(images: Path, out: Path, masks: str | None = None) -> dict:
    """Runs in its own process: label, then export each format."""
    from grounding.formats import export_coco, export_labelstudio, export_yolo
    from grounding.pipeline.detector import Detector, Query
    from grounding.runs.labeling import label
    from grounding.runs.rundir import RunDir
    from grounding.testing import StaticBackend

    run = RunDir(out / "run")
    detector = Detector(StaticBackend(label="object"), batch_size=16,
                        masks=segmenter(masks))
    t0 = time.perf_counter()
    summary = label(detector, Query.make(["object"]), images, run)
    label_s = time.perf_counter() - t0
    rss_label = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = {}
    for name, fn in (("coco", export_coco), ("yolo", export_yolo),
                     ("labelstudio", export_labelstudio)):
        t = time.perf_counter()
        fn(run.records(), images, ["object"], out / name)
        times[name] = time.perf_counter() - t
    return {"images": summary["images"], "label_s": label_s, "rss_label_mb": rss_label,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "export_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--masks", default=None,
                        help="segment every box: static (no model), tiny (tiny SAM 2) or "
                             "a SAM 2 checkpoint")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.masks)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            images = Path(tmp) / f"images{n}"
            make_images(images, n)
            out = Path(tmp) / f"out{n}"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            command = [sys.executable, __file__, "--child", str(images), str(out)]
            if args.masks:
                command += ["--masks", args.masks]
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    console = Console(width=120)
    console.print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                  f"Python {platform.python_version()}; 64x48 JPEGs, StaticBackend (no model)"
                  + (f"; masks: {args.masks}" if args.masks else ""))
    table = Table(title="Labelling pipeline")
    for col in ("images", "label s", "images/s", "peak RSS label MB", "peak RSS MB",
                "COCO s", "YOLO s", "Label Studio s"):
        table.add_column(col, justify="right")
    for r in rows:
        rate = r["images"] / r["label_s"]
        table.add_row(f"{r['images']:,}", f"{r['label_s']:.1f}", f"{rate:.0f}",
                      f"{r['rss_label_mb']:.0f}", f"{r['rss_peak_mb']:.0f}",
                      f"{r['export_s']['coco']:.2f}", f"{r['export_s']['yolo']:.2f}",
                      f"{r['export_s']['labelstudio']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
