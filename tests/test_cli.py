"""`grounding parse`: the debugging view of what a model said."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from grounding.cli.app import app
from tests.real_outputs import FIXTURES, raw_text

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_parse_stdin_model_frame():
    out = run("parse", "-", "--dialect", "qwen2.5-vl", input=raw_text("qwen25vl_spatial_sunglasses.txt"))
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["width"] is None and record["input_size"] is None
    assert record["detections"][0]["bbox"] == [150, 196, 308, 310]
    assert record["detections"][0]["label"] == "sunglasses"


def test_parse_rescaled_with_classes(tmp_path):
    answer = tmp_path / "answer.txt"
    answer.write_text(raw_text("qwen25vl_ocr_text_spotting_receipt.txt"))
    out = run("parse", str(answer), "-d", "qwen2.5-vl", "--input-size", "868x1400",
              "--image-size", "870x1398", "--classes", "TAX INVOICE,CASH")
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["image"] == str(answer)
    assert (record["width"], record["height"], record["input_size"]) == (870, 1398, [868, 1400])
    assert len(record["detections"]) == 39
    ids = {d["label"]: d["class_id"] for d in record["detections"]}
    assert ids["TAX INVOICE"] == 0 and ids["CASH"] == 1 and ids["Item"] is None
    assert record["detections"][0]["bbox"][0] == pytest.approx(125 * 870 / 868)


def test_input_size_derived_from_image_size():
    # The notebook ran the processor's own budget (3,136 .. 12,845,056 pixels), not the
    # one grounding's detect uses by default: give it, and the frame is the notebook's.
    out = run("parse", "-", "-d", "qwen2.5-vl", "--image-size", "870x1398",
              "--min-pixels", "3136", "--max-pixels", "12845056",
              input=raw_text("qwen25vl_ocr_text_spotting_receipt.txt"))
    assert out.exit_code == 0
    assert json.loads(out.stdout)["input_size"] == [868, 1400]  # as the real notebook printed
    assert "derived" in out.stderr


def test_relative_dialect_needs_only_image_size():
    out = run("parse", "-", "-d", "qwen3-vl", "--image-size", "640x479",
              input=raw_text("qwen3vl_2d_grounding_dining_table.txt"))
    record = json.loads(out.stdout)
    assert len(record["detections"]) == 27
    assert record["detections"][0]["bbox"] == pytest.approx([74 * 0.64, 361 * 0.479, 324 * 0.64, 808 * 0.479])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dialect", "gpt-vision"], "unknown dialect"),
        (["-d", "qwen2.5-vl", "--image-size", "big"], "WIDTHxHEIGHT"),
    ],
)
def test_bad_options_are_explained(args, message):
    out = run("parse", "-", *args, input="x")
    assert out.exit_code == 2
    assert message in out.output


def test_missing_file_names_the_file():
    out = run("parse", "/no/such/answer.txt", "-d", "qwen3-vl")
    assert out.exit_code == 2
    assert "/no/such/answer.txt" in out.stderr


def test_console_script_is_installed():
    exe = shutil.which("grounding")
    assert exe, "pip install -e . should put `grounding` on PATH"
    done = subprocess.run([exe, "parse", str(FIXTURES / "qwen3vl_spatial_point_free_space.txt"),
                           "-d", "qwen3-vl"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["points"][0]["point"] == [925, 618]
    assert "parse" in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout


def test_the_command_line_starts_without_importing_torch():
    """`grounding parse` and `--help` must not pay torch's and transformers' import time."""
    import subprocess
    import sys

    code = ("import sys, grounding.cli.app; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
