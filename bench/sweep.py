"""Choosing a score threshold with `grounding eval --sweep`, on a detector with a known answer.

    python bench/sweep.py                      # 40 scenes, the table and assets/pr_curve.png
    python bench/sweep.py --keep /tmp/sweep    # keep the run and the truth to look at

No model runs here: the run is written by a *simulated* detector over synthetic scenes
(grounding.testing.scenes), so that the curve has something to show: each true object is
found with probability ``--recall`` (0.9), its box jittered by a few pixels and scored
high (0.55-0.99), and each image gets about ``--false`` (1.5) made-up boxes scored low
(0.05-0.75). Real models' curves differ; what this shows is the command, its table and
its plot. The run is then scored by the real command:
``grounding eval RUN --gt truth.json --sweep --target-precision P``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from grounding.testing.scenes import scenes, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def simulate(truth: dict, classes: list[str], rng: np.random.Generator, recall: float,
             false: float) -> list[dict]:
    """One record per image of the COCO ``truth``: found objects and made-up ones."""
    by_image: dict[int, list[dict]] = {}
    for a in truth["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    names = {c["id"]: c["name"] for c in truth["categories"]}
    records = []
    for image in truth["images"]:
        w, h = image["width"], image["height"]
        detections = []
        for a in by_image.get(image["id"], []):
            if rng.random() > recall:
                continue
            x, y, bw, bh = a["bbox"]
            jitter = rng.normal(0, 0.04 * min(bw, bh), 4)
            box = [x + jitter[0], y + jitter[1], x + bw + jitter[2], y + bh + jitter[3]]
            label = names[a["category_id"]]
            detections.append({"label": label, "class_id": classes.index(label),
                               "bbox": [round(float(v), 1) for v in box],
                               "score": round(float(rng.uniform(0.55, 0.99)), 3)})
        for _ in range(rng.poisson(false)):
            bw, bh = rng.uniform(0.05, 0.25) * w, rng.uniform(0.05, 0.25) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            label = classes[int(rng.integers(len(classes)))]
            detections.append({"label": label, "class_id": classes.index(label),
                               "bbox": [round(float(v), 1) for v in (x, y, x + bw, y + bh)],
                               "score": round(float(rng.uniform(0.05, 0.75)), 3)})
        records.append({"image": image["file_name"], "width": w, "height": h,
                        "model": "simulated", "dialect": "qwen2.5-vl", "classes": classes,
                        "detections": detections, "points": [], "raw": "",
                        "truncated": False, "error": None})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--recall", type=float, default=0.9)
    parser.add_argument("--false", type=float, default=1.5)
    parser.add_argument("--target-precision", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=ROOT / "assets" / "pr_curve.png")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="gr-sweep-"))
    try:
        data = write_dataset(root / "data", scenes(args.images, 640, 480, 6, seed=args.seed))
        truth = json.loads(data.truth.read_text())
        records = simulate(truth, data.classes, np.random.default_rng(args.seed), args.recall,
                           args.false)
        run = root / "run"
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(json.dumps({
            "images_dir": str(data.images_dir), "classes": data.classes, "model": "simulated",
            "dialect": "qwen2.5-vl", "grounding_version": "bench"}))
        with (run / "predictions.jsonl").open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"{len(records)} scenes of 640x480, "
              f"{len(truth['annotations'])} objects; simulated detector: recall "
              f"{args.recall}, {args.false} false boxes per image")
        done = subprocess.run([sys.executable, "-m", "grounding", "eval", str(run), "--gt",
                               str(data.truth), "--sweep", "--target-precision",
                               str(args.target_precision)], text=True, capture_output=True)
        print(done.stdout)
        if done.returncode != 0:
            sys.exit(done.stderr)
        plot = run / "eval" / "pr_curve.png"
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, args.plot)
        print(f"plot: {args.plot}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
