"""`grounding label` when something is wrong: the exit status (0 every image labelled, 1
some images failed, 2 nothing could start), one line instead of a traceback, a server
that is down, an empty folder, a run directory inside the images folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import grounding
from grounding.cli.app import app
from grounding.io.records import read_jsonl
from grounding.testing.loopback import LoopbackServer, grounding_handler, openai_error
from tests.test_cli_detect import one_error_line, red_box, refused_url, remote

runner = CliRunner()

MAIN = Path(grounding.__file__).with_name("__main__.py")
EXE = ([sys.executable, "-m", "grounding"] if MAIN.exists()
       else [shutil.which("grounding") or "grounding"])
"""The command in a subprocess: ``python -m grounding`` where grounding has a __main__."""


@pytest.fixture(scope="module")
def server():
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="box")) as s:
        yield s


def photos(root: Path, n: int, broken: int = 0) -> Path:
    for i in range(n):
        red_box(root / f"p{i}.jpg", (100 + i, 80))
    for i in range(broken):
        (root / f"broken{i}.jpg").write_bytes(b"not an image")
    return root


def label(*args: str):
    return runner.invoke(app, ["label", *args])


def test_all_labelled_is_0_and_some_failed_is_1(tmp_path, server):
    images = photos(tmp_path / "photos", 3)
    run = tmp_path / "run"
    done = label(str(images), "--out", str(run), "--classes", "box", *remote(server.base_url))
    assert done.exit_code == 0, done.output
    (images / "broken0.jpg").write_bytes(b"not an image")
    out = label(str(images), "--out", str(run), "--classes", "box", *remote(server.base_url))
    assert out.exit_code == 1
    assert "1 images of this run failed (1 in this session)" in out.stderr
    assert json.loads(out.stdout)["errors"] == 1
    # A rerun still leaves the run incomplete; fixing the image and retrying completes it.
    again = label(str(images), "--out", str(run), "--classes", "box", *remote(server.base_url))
    assert again.exit_code == 1 and "(0 in this session)" in again.stderr
    red_box(images / "broken0.jpg")
    fixed = label(str(images), "--out", str(run), "--classes", "box", "--retry-errors",
                  *remote(server.base_url))
    assert fixed.exit_code == 0, fixed.output
    assert list(read_jsonl(run / "errors.jsonl")) == []


def test_every_image_failed_on_a_server_that_answers_is_1(tmp_path):
    images = photos(tmp_path / "photos", 4)
    with LoopbackServer(handler=lambda request: openai_error(400, "bad image")) as server:
        out = label(str(images), "--out", str(tmp_path / "run"), "--classes", "box",
                    *remote(server.base_url))
    assert out.exit_code == 1
    assert len(list(read_jsonl(tmp_path / "run" / "errors.jsonl"))) == 4


def test_a_server_that_cannot_be_reached_stops_at_once_with_one_line(tmp_path):
    images = photos(tmp_path / "photos", 40)
    url = refused_url()
    started = time.monotonic()
    out = label(str(images), "--out", str(tmp_path / "run"), "--classes", "box",
                "--concurrency", "2", *remote(url))
    assert out.exit_code == 2, out.output
    line = one_error_line(out)
    assert line.startswith(f"error: cannot reach {url}: ")
    assert time.monotonic() - started < 60
    assert list(read_jsonl(tmp_path / "run" / "errors.jsonl")) == []
    assert list(read_jsonl(tmp_path / "run" / "predictions.jsonl")) == []


@pytest.mark.parametrize("folder", ["empty", "typo", "file.jpg"])
def test_an_empty_mistyped_or_missing_folder_is_one_line_and_2(tmp_path, folder):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    red_box(tmp_path / "file.jpg")
    out = label(str(tmp_path / folder), "--out", str(tmp_path / "run"), "--classes", "box",
                *remote(refused_url()))
    assert out.exit_code == 2
    line = one_error_line(out)
    assert str(tmp_path / folder) in line
    if folder == "empty":
        assert "no images in" in line and ".jpg" in line and ".png" in line
    assert not (tmp_path / "run").exists()


def test_a_refused_configuration_prints_no_progress_bar(tmp_path, server):
    images = photos(tmp_path / "photos", 2)
    run = tmp_path / "run"
    assert label(str(images), "--out", str(run), "--classes", "box",
                 *remote(server.base_url)).exit_code == 0
    out = label(str(images), "--out", str(run), "--classes", "box,cat",
                *remote(server.base_url))
    assert out.exit_code == 2
    assert "another configuration" in one_error_line(out)
    assert "labelling" not in out.stderr and "img/s" not in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", ""], "names no class"),
    (["--classes", " , ,"], "names no class"),
    (["--classes", "box", "--min-pixels", "900", "--max-pixels", "800"], "is above"),
    (["--classes", "box", "--max-pixels", "100"], "below the smallest model frame"),
])
def test_bad_options_are_one_line(tmp_path, server, args, message):
    server.reset()
    images = photos(tmp_path / "photos", 2)
    out = label(str(images), "--out", str(tmp_path / "run"), *args, *remote(server.base_url))
    assert out.exit_code == 2
    assert message in one_error_line(out)
    assert server.completions == []


def test_out_pointing_at_a_file_is_one_line(tmp_path):
    images = photos(tmp_path / "photos", 1)
    (tmp_path / "run").write_text("a file")
    out = label(str(images), "--out", str(tmp_path / "run"), "--classes", "box",
                *remote(refused_url()))
    assert out.exit_code == 2
    assert "is a file, not a directory" in one_error_line(out)


def test_out_inside_the_images_folder_labels_only_the_images(tmp_path, server):
    """`grounding label photos --out photos/run --format coco,yolo`, twice: the run, its
    exports and their linked copies are never labelled."""
    images = photos(tmp_path / "photos", 6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["label", str(images), "--out", str(images / "run"), "--format", "coco,yolo",
            "--classes", "box", *remote(server.base_url)]
    for session in range(2):
        done = subprocess.run([*EXE, *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["images"] == 6
        assert summary["session"]["labelled"] == (6 if session == 0 else 0)
    records = list(read_jsonl(images / "run" / "predictions.jsonl"))
    assert sorted(r["image"] for r in records) == [f"p{i}.jpg" for i in range(6)]
    coco = json.loads((images / "run" / "export" / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == 6


@pytest.mark.skipif(not MAIN.exists(), reason="grounding/__main__.py comes with another change")
def test_python_dash_m_grounding_label_exit_status(tmp_path, server):
    images = photos(tmp_path / "photos", 2, broken=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "grounding", "label"]
    some = subprocess.run([*base, str(images), "--out", str(tmp_path / "run"), "--classes",
                           "box", *remote(server.base_url)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert some.returncode == 1, some.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = subprocess.run([*base, str(empty), "--out", str(tmp_path / "run2"), "--classes",
                           "box", *remote(server.base_url)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert none.returncode == 2
    assert none.stderr.strip().splitlines() == [
        f"error: no images in {empty}: looked for .bmp, .jpeg, .jpg, .mpo, .png, .tif, .tiff, "
        ".webp files, any case, in subfolders too"]
