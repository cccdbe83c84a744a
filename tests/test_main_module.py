"""``python -m grounding`` is the ``grounding`` command."""

from __future__ import annotations

import subprocess
import sys


def test_python_dash_m_grounding_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "grounding", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage: grounding" in out.stdout
    for command in ("detect", "label", "export", "eval"):
        assert command in out.stdout
    bad = subprocess.run([sys.executable, "-m", "grounding", "no-such-command"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-command" in bad.stderr
