"""bench/gpu_check.py: the acceptance logic as a pure function, and the whole script in
plumbing mode (tiny random checkpoint on the CPU, as it runs on a machine without CUDA)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact(truth):
    """Predictions equal to the ground truth."""
    predicted: dict[str, list] = {}
    for image, name, box in truth:
        predicted.setdefault(image, []).append((name, box))
    return predicted


def test_exact_boxes_pass(gpu_check):
    truth, _ = gpu_check.load_truth()
    best, failures = gpu_check.acceptance(truth, exact(truth))
    assert failures == []
    assert best == pytest.approx([1.0] * len(truth))


def test_a_rocket_shifted_off_target_fails(gpu_check):
    truth, _ = gpu_check.load_truth()
    predicted = exact(truth)
    x1, y1, x2, y2 = predicted["rocket.jpg"][0][1]
    shift = (x2 - x1) * 0.7  # a thin box: 70% of its width sideways leaves IoU 0.18
    predicted["rocket.jpg"] = [("rocket", (x1 + shift, y1, x2 + shift, y2))]
    best, failures = gpu_check.acceptance(truth, predicted)
    assert len(failures) == 1 and failures[0].startswith("rocket in rocket.jpg: IoU 0.18")
    assert min(best) == pytest.approx(0.3 / 1.7)


def test_a_missing_astronaut_fails(gpu_check):
    truth, _ = gpu_check.load_truth()
    predicted = exact(truth)
    predicted["astronaut.jpg"] = [p for p in predicted["astronaut.jpg"] if p[0] != "person"]
    _, failures = gpu_check.acceptance(truth, predicted)
    assert failures == ["person in astronaut.jpg: IoU 0.00 < 0.5"]


def test_a_box_of_another_class_does_not_count(gpu_check):
    """The cat's box labelled "cat" is not a "cat face", however much it overlaps."""
    truth, _ = gpu_check.load_truth()
    predicted = exact(truth)
    predicted["cat_exif_rotated.jpg"] = [(name, box) for name, box in
                                         predicted["cat_exif_rotated.jpg"] if name == "cat"] * 2
    _, failures = gpu_check.acceptance(truth, predicted)
    assert failures == ["cat face in cat_exif_rotated.jpg: IoU 0.00 < 0.5"]


def test_an_obvious_object_missing_from_the_ground_truth_fails(gpu_check):
    truth, _ = gpu_check.load_truth()
    _, failures = gpu_check.acceptance(truth, exact(truth),
                                       obvious=[("rocket.jpg", "launch tower")])
    assert failures == ["no ground truth for launch tower in rocket.jpg"]


def test_plumbing_mode_runs_end_to_end(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # plumbing on any machine
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "mode: CPU plumbing" in out and "n/a (random weights)" in out
    for batch in gpu_check.BATCHES:
        assert re.search(rf"^\W+{batch}\s+\W\s+\d+\.\d\d\s", out, re.M), out
    assert "peak RSS GiB" in out and "batch 8 vs batch 1:" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS (plumbing only: no GPU visible")
