"""One Label Studio server on 127.0.0.1 for the whole test session.

Started once (about 50 s on 2 cores) with its own temporary data directory and a user
made for the test, whose legacy API token the tests use (Label Studio 1.23 refuses
legacy tokens unless started with ``--enable-legacy-api-token`` and
``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true``); stopped at the end. The executable is
``$GROUNDING_LABEL_STUDIO``, else ``label-studio`` on the PATH or beside this Python;
without one the tests that need it are skipped. Label Studio pins versions of numpy and
opencv that grounding does not, so it may live in a virtual environment of its own:
``python -m venv /opt/ls && /opt/ls/bin/pip install label-studio`` and
``GROUNDING_LABEL_STUDIO=/opt/ls/bin/label-studio``. Its output goes to
``label-studio.log`` in the data directory's parent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 240.0
USER, PASSWORD = "reviewer@example.com", "grounding-test-password"
TOKEN = "grounding0test0token0abcdef0123456789"


@dataclass
class LabelStudioServer:
    url: str
    token: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO_VENV = Path(__file__).resolve().parents[1] / ".ls-venv" / "bin" / "label-studio"
"""Where the README's Development step installs Label Studio (a venv of its own)."""


def _executable() -> str | None:
    found = os.environ.get("GROUNDING_LABEL_STUDIO")
    if found:
        return found
    if REPO_VENV.exists():
        return str(REPO_VENV)
    beside = Path(sys.executable).with_name("label-studio")
    return str(beside) if beside.exists() else shutil.which("label-studio")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory) -> LabelStudioServer:
    pytest.importorskip("label_studio_sdk")
    exe = _executable()
    if exe is None:
        pytest.skip("Label Studio is not installed (README, Development: a .ls-venv of its "
                    "own; or set GROUNDING_LABEL_STUDIO to its label-studio executable)")
    base = tmp_path_factory.mktemp("label-studio")
    data = base / "data"
    data.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LABEL_STUDIO_BASE_DATA_DIR": str(data), "HOME": str(base),
           "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
    env.pop("PYTHONPATH", None)  # its own environment, not grounding's
    log_path = base / "label-studio.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [exe, "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(data), "--username", USER, "--password", PASSWORD,
             "--user-token", TOKEN, "--enable-legacy-api-token"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=base, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"label-studio exited ({proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"label-studio did not answer /health in "
                                   f"{START_TIMEOUT:.0f} s; see {log_path}")
            time.sleep(1)
        yield LabelStudioServer(url, TOKEN, log_path)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it was started in a session of its own),
    then SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.wait(timeout=10)
