"""One local Ray cluster for the whole test session (started once: about 10 s on 2 cores).

``ray start --head --block`` in a subprocess, joined by the tests' drivers through its
address; stopped (with every Ray process it started) at the end of the session. It has 4
logical CPUs on any machine, so a pool of two CPU workers leaves room for the image
readers (logical CPUs only decide scheduling). Workers inherit the environment it was
started with: OMP_NUM_THREADS=1, and the S3 test server's endpoint and keys, so they
read the bucket the way a cluster node configured for object storage does.
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
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    """The environment a driver of this cluster runs with (the S3 server's keys too)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> RayCluster:
    pytest.importorskip("ray.data")
    ray_exe = Path(sys.executable).with_name("ray")
    if not ray_exe.exists():
        found = shutil.which("ray")
        if found is None:
            pytest.skip("the ray command is not installed")
        ray_exe = Path(found)
    port = _free_port()
    # A short temp dir: Ray's socket paths must fit in 107 bytes.
    temp = tempfile.mkdtemp(prefix="gr-ray-", dir="/tmp")
    # Token authentication, as Ray 2.5x+ starts clusters by default; the token is given
    # to the cluster and its drivers alike, so no ~/.ray/auth_token of the machine's
    # own (or its absence) changes what the tests see.
    env = {**os.environ, **s3_server.env, "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    log = open(Path(temp) / "start.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(ray_exe), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}", "--node-ip-address=127.0.0.1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _up(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError("ray start failed: "
                                   + (Path(temp) / "start.log").read_text()[-2000:])
            time.sleep(0.2)
        yield RayCluster(address=f"127.0.0.1:{port}", env=env)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
