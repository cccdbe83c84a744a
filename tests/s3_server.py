"""One S3-compatible server (moto's server mode) on 127.0.0.1 for the whole test session.

Started once (a few seconds), with one bucket; stopped at the end. ``env`` holds what
a process needs to read it as a user's S3 would be read: the standard AWS variables,
AWS_ENDPOINT_URL pointing at the server.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from grounding.testing.cluster import free_port, port_open


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        found = shutil.which("moto_server")
        if found is None:
            pytest.skip("moto_server is not installed (pip install 'moto[server]')")
        exe = Path(found)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        deadline = time.monotonic() + 60
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        try:
            client.create_bucket(Bucket="grounding-test")
        finally:
            client.close()
        yield S3Server(endpoint, "grounding-test", env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
