"""A one-node Ray cluster on this machine, for tests and benchmarks of ``--engine ray``.

``ray start --head --block`` in its own process group, on a free port, with token
authentication (Ray's default for new clusters since 2.5x) whose token is put in
:attr:`RayCluster.env`, the environment for the cluster and its drivers alike, so a
``~/.ray/auth_token`` of the machine's own (or its absence) changes nothing. Stopped
with every Ray process it started. Logical CPUs only decide scheduling: a cluster of 4
on 2 cores lets a pool of two workers run beside the image readers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["RayCluster", "free_port", "port_open"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ray_command() -> str:
    """The ``ray`` script beside this interpreter (else on PATH)."""
    exe = Path(sys.executable).with_name("ray")
    found = str(exe) if exe.exists() else shutil.which("ray")
    if found is None:
        raise RuntimeError("the ray command is not installed: pip install 'grounding[ray]'")
    return found


class RayCluster:
    """``with RayCluster(cpus=4, env=...) as cluster:`` joins at ``cluster.address``
    with ``cluster.env``; ``cluster.startup`` is how long ``ray start`` took to listen."""

    def __init__(self, *, cpus: int = 4, env: dict[str, str] | None = None) -> None:
        self.env = {**(os.environ if env is None else env), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.cpus = cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.startup = 0.0
        self._temp = ""

    def __enter__(self) -> RayCluster:
        # A short temp dir: Ray's socket paths must fit in 107 bytes.
        self._temp = tempfile.mkdtemp(prefix="gr-ray-", dir="/tmp")
        log_path = Path(self._temp) / "start.log"
        self._log = log_path.open("wb")
        started = time.perf_counter()
        self._proc = subprocess.Popen(
            [ray_command(), "start", "--head", "--block", f"--port={self.port}",
             f"--num-cpus={self.cpus}", "--num-gpus=0", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={self._temp}",
             "--node-ip-address=127.0.0.1"],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while not port_open(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                tail = log_path.read_text(errors="replace")[-2000:]
                self.__exit__()
                raise RuntimeError(f"ray start failed: {tail}")
            time.sleep(0.05)
        self.startup = time.perf_counter() - started
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=30)
        self._log.close()
        shutil.rmtree(self._temp, ignore_errors=True)
