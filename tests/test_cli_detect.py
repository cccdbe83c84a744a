"""`grounding detect` as a person meets it: output names, flags, one-line errors and the
exit status (0 every image done, 1 some failed, 2 nothing could start)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from grounding.cli.app import app
from grounding.testing import tiny_checkpoint
from grounding.testing.loopback import LoopbackServer, grounding_handler, openai_error

runner = CliRunner()


def red_box(path: Path, size=(120, 90)) -> Path:
    a = np.full((size[1], size[0], 3), 200, np.uint8)
    a[20:50, 30:70] = (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def refused_url() -> str:
    """A local URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def server():
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="box")) as s:
        yield s


def remote(url: str) -> list[str]:
    return ["--backend", "openai", "--base-url", url, "--model", "qwen2.5-vl-7b",
            "--max-retries", "1"]


def detect(*args: str):
    return runner.invoke(app, ["detect", *args])


def one_error_line(out) -> str:
    """The one ``error:`` line of a failed command (and no traceback)."""
    assert "Traceback" not in out.output, out.output
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_inputs_with_one_stem_never_overwrite_each_other(tmp_path, server):
    images = [red_box(tmp_path / "x.jpg"), red_box(tmp_path / "b" / "x.jpg", (100, 80)),
              red_box(tmp_path / "x-1.jpg", (90, 70)), red_box(tmp_path / "c" / "x-2.png")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "x-3.json").write_text(json.dumps({"image": "someone/else.jpg"}))  # not ours
    for _ in range(2):  # a rerun overwrites its own files, and only those
        done = detect(*map(str, images), "--classes", "box", "--out", str(out),
                      *remote(server.base_url))
        assert done.exit_code == 0, done.output
        records = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
        assert len(records) == 5
        mine = {name: r["image"] for name, r in records.items() if name != "x-3.json"}
        assert sorted(mine.values()) == sorted(map(str, images))  # one record per input
        assert mine["x.json"] == str(images[0]) and mine["x-1.json"] == str(images[2])
        assert records["x-3.json"] == {"image": "someone/else.jpg"}
        assert sorted(p.stem for p in out.glob("*.jpg")) == sorted(p[:-5] for p in mine)


def test_an_output_name_is_never_an_input(tmp_path, server):
    out = tmp_path / "out"
    image = red_box(out / "x.jpg")  # the overlay of x.jpg would be the input itself
    before = image.read_bytes()
    done = detect(str(image), "--classes", "box", "--out", str(out), *remote(server.base_url))
    assert done.exit_code == 0, done.output
    assert image.read_bytes() == before
    assert json.loads((out / "x-2.json").read_text())["image"] == str(image)


def test_boolean_options_are_flags_in_help_and_on_the_command_line():
    command = typer.main.get_command(app).commands["detect"]
    ctx = command.make_context("detect", ["img.jpg", "--points", "--classes", "cat",
                                          "--verify"])
    assert ctx.params["images"] == [Path("img.jpg")]
    assert ctx.params["points"] is True and ctx.params["verify"] is True
    ctx = command.make_context("detect", ["--points", "img.jpg", "--no-logprobs"])
    assert ctx.params["images"] == [Path("img.jpg")] and ctx.params["logprobs"] is False
    for name in ("detect", "label"):
        shown = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert shown.exit_code == 0
        rows = [line for line in shown.output.splitlines()
                if any(f in line for f in ("--points", "--verify ", "--logprobs", "--force",
                                           "--retry-errors", "--text-first", "--help"))]
        assert rows and not [row for row in rows if "<bool>" in row], rows
        assert "Exit status: 0" in shown.output and "2 nothing could start" in shown.output
    top = runner.invoke(app, ["--help"], terminal_width=200)
    assert [line for line in top.output.splitlines() if "--help" in line or "--version" in line]
    assert "<bool>" not in top.output


def test_a_value_after_a_switch_is_explained_not_run_as_an_image(tmp_path):
    image = str(red_box(tmp_path / "a.jpg"))
    out = detect(image, "--points", "true", "--classes", "cat", *remote(refused_url()))
    assert out.exit_code == 2
    assert "take no value (--points, not --points true)" in one_error_line(out)


@pytest.mark.parametrize("classes", ["", " , ,"])
def test_a_class_list_naming_no_class_is_one_line(tmp_path, classes):
    out = detect(str(red_box(tmp_path / "a.jpg")), "--classes", classes,
                 *remote(refused_url()))
    assert out.exit_code == 2
    assert "names no class" in one_error_line(out)


def test_out_pointing_at_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file of the user's")
    out = detect(str(red_box(tmp_path / "a.jpg")), "--classes", "box", "--out",
                 str(tmp_path / "taken"), *remote(refused_url()))
    assert out.exit_code == 2
    assert "is a file, not a directory" in one_error_line(out)
    assert (tmp_path / "taken").read_text() == "a file of the user's"


@pytest.mark.parametrize(("budget", "message"), [
    (["--min-pixels", "2000000", "--max-pixels", "1000000"],
     "--min-pixels 2000000 is above --max-pixels 1000000"),
    (["--max-pixels", "100"], "--max-pixels 100 is below the smallest model frame of "
                              "qwen2.5-vl (28x28 = 784 pixels)"),
])
def test_a_pixel_budget_no_image_fits_is_checked_once_up_front(tmp_path, server, budget,
                                                                message):
    server.reset()
    images = [str(red_box(tmp_path / f"{i}.jpg")) for i in range(3)]
    out = detect(*images, "--classes", "box", *budget, *remote(server.base_url))
    assert out.exit_code == 2
    assert message in one_error_line(out)
    assert server.completions == []  # not one request per image
    assert out.stdout == ""


def test_a_pixel_budget_under_the_local_models_frame_is_one_line(tmp_path):
    model = str(tiny_checkpoint("qwen2.5-vl"))
    image = str(red_box(tmp_path / "a.jpg"))
    for budget, message in ((["--min-pixels", "5000", "--max-pixels", "4000"], "is above"),
                            (["--max-pixels", "100"], "below the smallest model frame")):
        out = detect(image, "--classes", "box", "--model", model, "--device", "cpu",
                     "--max-new-tokens", "4", *budget)
        assert out.exit_code == 2
        assert message in one_error_line(out)


def test_exit_status_zero_all_done_one_some_failed(tmp_path, server):
    good = [str(red_box(tmp_path / f"{i}.jpg")) for i in range(2)]
    assert detect(*good, "--classes", "box", *remote(server.base_url)).exit_code == 0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = detect(*good, str(broken), "--classes", "box", *remote(server.base_url))
    assert out.exit_code == 1
    assert len(out.stdout.splitlines()) == 3  # every image has its record
    assert "1 of 3 images failed" in out.stderr


def test_a_server_answering_errors_is_some_images_failed(tmp_path):
    with LoopbackServer(handler=lambda request: openai_error(400, "bad image")) as server:
        images = [str(red_box(tmp_path / f"{i}.jpg")) for i in range(4)]
        out = detect(*images, "--classes", "box", *remote(server.base_url))
    assert out.exit_code == 1
    assert len(out.stdout.splitlines()) == 4


def test_a_server_that_cannot_be_reached_is_exit_2_and_one_line(tmp_path):
    images = [str(red_box(tmp_path / f"{i}.jpg")) for i in range(6)]
    url = refused_url()
    out = detect(*images, "--classes", "box", *remote(url))
    assert out.exit_code == 2, out.output
    line = one_error_line(out)
    assert line.startswith(f"error: cannot reach {url}: ") and "nothing was recorded" in line
    assert out.stdout == ""
