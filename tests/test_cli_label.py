"""The whole job through the real command line: label a folder against a served model
(loopback server), kill it, resume, export COCO / YOLO / Label Studio, evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grounding.io.records import read_jsonl
from grounding.testing.loopback import LoopbackServer, grounding_handler

EXE = [sys.executable, "-m", "grounding"]
"""The command, run as ``python -m grounding`` by the interpreter running the tests: the
same program as the ``grounding`` script, which need not be on PATH."""


def red_box_images(root: Path, n: int, *, size: tuple[int, int] | None = None,
                   seed: int = 1) -> dict[str, list[float]]:
    """Images with one red rectangle each (of random sizes, or all of ``size``); returns
    the true box per relative path."""
    truth = {}
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = size or (int(rng.integers(120, 300)), int(rng.integers(100, 260)))
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x2, y2 = x1 + w // 3, y1 + h // 3
        a = np.full((h, w, 3), 200, np.uint8)
        a[y1:y2, x1:x2] = (255, 0, 0)
        rel = f"set{i % 2}/img{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / rel)
        truth[rel] = [x1, y1, x2, y2]
    return truth


def cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_label_resume_export_eval_end_to_end(tmp_path):
    images = tmp_path / "images"
    truth = red_box_images(images, 24)
    run = tmp_path / "run"
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="box"),
                        latency=0.05) as server:
        args = ["label", str(images), "--classes", "box", "--out", str(run), "--backend",
                "openai", "--base-url", server.base_url, "--model", "Qwen/Qwen2.5-VL-7B-Instruct",
                "--concurrency", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([*EXE, *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        predictions = run / "predictions.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if predictions.exists() and predictions.read_text().count("\n") >= 5:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        partial = [r["image"] for r in read_jsonl(predictions)]
        assert 5 <= len(partial) < 24
        done = cli(*args, "--format", "coco,yolo,labelstudio")
        assert done.returncode == 0, done.stderr
    records = list(read_jsonl(predictions))
    assert sorted(r["image"] for r in records) == sorted(truth)
    for r in records:  # boxes land on the red rectangle of the original image
        assert r["detections"][0]["bbox"] == pytest.approx(truth[r["image"]], abs=1.0)
    summary = json.loads(done.stdout)
    assert summary["images"] == 24 and summary["objects_per_class"] == {"box": 24}
    export = run / "export"
    assert (export / "coco" / "annotations.json").exists()
    assert (export / "yolo" / "data.yaml").exists()
    assert (export / "labelstudio" / "tasks.json").exists()

    # Ground truth = the true boxes, as a COCO file: eval must find a near-perfect run.
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}]}
    for i, (rel, (x1, y1, x2, y2)) in enumerate(sorted(truth.items()), start=1):
        with Image.open(images / rel) as im:
            w, h = im.size
        gt["images"].append({"id": i, "file_name": rel, "width": w, "height": h})
        gt["annotations"].append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                                  "bbox": [x1, y1, x2 - x1, y2 - y1],
                                  "area": (x2 - x1) * (y2 - y1)})
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    report = cli("eval", str(run), "--gt", str(gt_path), "--json")
    assert report.returncode == 0, report.stderr
    metrics = json.loads(report.stdout)
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["map50_95"] > 0.8

    # A second export into the grounding-owned folder rebuilds it; into a user folder
    # that is not empty it is refused.
    again = cli("export", str(run), "--format", "yolo")
    assert again.returncode == 0, again.stderr
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "keep.txt").write_text("user data")
    refused = cli("export", str(run), "--format", "coco", "--out", str(mine))
    assert refused.returncode == 2 and "error" in refused.stderr
    assert (mine / "images" / "keep.txt").read_text() == "user data"


def test_label_refuses_changed_classes_and_bad_options(tmp_path):
    images = tmp_path / "images"
    red_box_images(images, 2)
    with LoopbackServer(handler=grounding_handler("qwen3-vl", label="box")) as server:
        base = ["label", str(images), "--out", str(tmp_path / "run"), "--backend", "openai",
                "--base-url", server.base_url, "--model", "qwen3-vl-8b"]
        assert cli(*base, "--classes", "box").returncode == 0
        changed = cli(*base, "--classes", "box,cat")
        assert changed.returncode == 2 and "another configuration" in changed.stderr
        assert cli(*base, "--classes", "box", "--shard", "3/2").returncode == 2
        assert cli(*base, "--classes", "box", "--format", "pascal").returncode == 2
        no_key = cli(*base, "--classes", "box", "--api-key-env", "GROUNDING_NO_SUCH_KEY")
        assert no_key.returncode == 2 and "GROUNDING_NO_SUCH_KEY" in no_key.stderr
