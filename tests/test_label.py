"""`grounding label`: streaming, resumable, shardable runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grounding.io.records import read_jsonl, repair_jsonl
from grounding.pipeline.detector import Detector, Query
from grounding.runs.labeling import label
from grounding.runs.rundir import RunConfigError, RunDir, find_images, in_shard, parse_shard
from grounding.testing import StaticBackend


def make_images(root: Path, n: int, bad: int = 0) -> list[str]:
    """n small images in nested folders (mixed extensions and case) + `bad` broken files."""
    names = []
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = [".jpg", ".PNG", ".jpeg", ".webp"][i % 4]
        path = sub / f"img{i:04d}{ext}"
        Image.fromarray(np.full((24 + i % 5, 32, 3), i % 255, np.uint8)).save(
            path, format={".jpg": "JPEG", ".png": "PNG", ".jpeg": "JPEG", ".webp": "WEBP"}[ext.lower()])
        names.append(path.relative_to(root).as_posix())
    for j in range(bad):
        path = root / f"broken{j}.jpg"
        path.write_bytes(b"\xff\xd8 not really a jpeg")
        names.append(path.relative_to(root).as_posix())
    (root / "notes.txt").write_text("not an image")
    return names


def run_label(images, out, **kw):
    det = Detector(StaticBackend(label="cat"), batch_size=4)
    return label(det, Query.make(["cat", "dog"]), images, RunDir(out), **kw)


def test_find_images_recursive_stable_case_insensitive(tmp_path):
    names = make_images(tmp_path, 8)
    found = list(find_images(tmp_path))
    assert found == sorted(found)  # sorted walk: part0/... before part1/...
    assert found == list(find_images(tmp_path))
    assert set(found) == set(names)
    assert "notes.txt" not in found


def test_label_writes_records_errors_config_and_summary(tmp_path):
    images = tmp_path / "images"
    names = make_images(images, 10, bad=2)
    summary = run_label(images, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    records = list(run.records())
    assert sorted(r["image"] for r in records) == sorted(n for n in names if "broken" not in n)
    assert all(r["width"] == 32 and r["detections"][0]["class_id"] == 0 for r in records)
    errors = list(read_jsonl(run.errors))
    assert sorted(e["image"] for e in errors) == ["broken0.jpg", "broken1.jpg"]
    assert all("not an image" in e["error"] for e in errors)
    config = json.loads(run.run_json.read_text())
    assert config["classes"] == ["cat", "dog"] and config["dialect"] == "qwen2.5-vl"
    assert config["prompt"] and config["grounding_version"]
    assert summary["images"] == 10 and summary["objects"] == 10 and summary["errors"] == 2
    assert summary["objects_per_class"] == {"cat": 10, "dog": 0}
    assert json.loads(run.summary_json.read_text())["images"] == 10


def test_rerun_labels_nothing_twice_and_retry_errors(tmp_path):
    images = tmp_path / "images"
    make_images(images, 6, bad=1)
    run_label(images, tmp_path / "run")
    second = run_label(images, tmp_path / "run")
    assert second["session"]["labelled"] == 0
    (images / "broken0.jpg").unlink()
    Image.new("RGB", (40, 30)).save(images / "broken0.jpg")
    third = run_label(images, tmp_path / "run", retry_errors=True)
    assert third["session"]["labelled"] == 1 and third["errors"] == 0
    records = [r["image"] for r in RunDir(tmp_path / "run").records()]
    assert len(records) == len(set(records)) == 7


def test_changed_config_is_refused_unless_force(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3)
    run_label(images, tmp_path / "run")
    det = Detector(StaticBackend(label="cat"))
    with pytest.raises(RunConfigError, match="classes"):
        label(det, Query.make(["cat", "bird"]), images, RunDir(tmp_path / "run"))
    summary = label(det, Query.make(["cat", "bird"]), images, RunDir(tmp_path / "run"), force=True)
    assert summary["session"]["labelled"] == 3
    kept = list((tmp_path / "run").glob("predictions.*.jsonl"))
    assert len(kept) == 1 and len(list(read_jsonl(kept[0]))) == 3  # old labels kept, not lost


def test_reference_images_are_part_of_the_configuration(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3)
    Image.fromarray(np.full((20, 30, 3), 10, np.uint8)).save(tmp_path / "a.png")
    det = Detector(StaticBackend(label="cat"))
    with_a = Query.make(["cat"], references=[tmp_path / "a.png"])
    label(det, with_a, images, RunDir(tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "run.json").read_text())
    (entry,) = config["references"]
    assert entry.startswith(str(tmp_path / "a.png")) and "sha1:" in entry
    assert config["prompt"].startswith("The first image is an example")
    # The same file with other pixels is another configuration; so is no reference at all.
    Image.fromarray(np.full((20, 30, 3), 99, np.uint8)).save(tmp_path / "a.png")
    for query in (Query.make(["cat"], references=[tmp_path / "a.png"]), Query.make(["cat"])):
        with pytest.raises(RunConfigError, match="references"):
            label(det, query, images, RunDir(tmp_path / "run"))


def test_shards_partition_the_images(tmp_path):
    images = tmp_path / "images"
    names = make_images(images, 30)
    seen = []
    for i in range(3):
        run_label(images, tmp_path / f"run{i}", shard=(i, 3))
        seen += [r["image"] for r in RunDir(tmp_path / f"run{i}").records()]
    assert sorted(seen) == sorted(names)
    assert all(in_shard(n, 0, 1) for n in names)
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(ValueError):
        parse_shard("4/4")


def test_repair_cuts_a_half_written_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a"}\n{"image": "b"}\n{"image": "c", "det')
    assert repair_jsonl(path) > 0
    assert [r["image"] for r in read_jsonl(path)] == ["a", "b"]
    assert repair_jsonl(path) == 0


SCRIPT = textwrap.dedent("""
    import sys
    from grounding.pipeline.detector import Detector, Query
    from grounding.runs.labeling import label
    from grounding.runs.rundir import RunDir
    from grounding.testing import StaticBackend
    det = Detector(StaticBackend(label="cat", delay=float(sys.argv[3])), batch_size=2)
    label(det, Query.make(["cat"]), sys.argv[1], RunDir(sys.argv[2]))
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, sig):
    images = tmp_path / "images"
    names = make_images(images, 40)
    out = tmp_path / "run"
    script = tmp_path / "run_label.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(images), str(out), "0.15"], env=env)
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if predictions.exists() and predictions.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    partial = [r["image"] for r in read_jsonl(predictions)]
    assert 6 <= len(partial) < 40, "the run must have been stopped midway"
    if sig == signal.SIGKILL:
        # Simulate the worst moment for a kill: half a line at the end.
        with predictions.open("a") as f:
            f.write('{"image": "part0/img9999.jpg", "detec')
    done = subprocess.run([sys.executable, str(script), str(images), str(out), "0"], env=env,
                          timeout=120)
    assert done.returncode == 0
    final = [r["image"] for r in read_jsonl(predictions)]
    assert len(final) == len(set(final)) == 40
    assert sorted(final) == sorted(names)
    assert final[: len(partial)] == partial  # what was labelled before the kill is kept
