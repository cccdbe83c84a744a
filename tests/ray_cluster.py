"""One local Ray cluster for the whole test session (grounding.testing.cluster), started
by the first test that asks for it and stopped at the end.

Workers inherit the environment it was started with: OMP_NUM_THREADS=1, and the S3 test
server's endpoint and keys, so they read the bucket the way a cluster node configured
for object storage does; drivers join with ``env`` (the same, with the cluster's token).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from grounding.testing.cluster import RayCluster


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> RayCluster:
    pytest.importorskip("ray.data")
    if not Path(sys.executable).with_name("ray").exists() and shutil.which("ray") is None:
        pytest.skip("the ray command is not installed")
    env = {**os.environ, **s3_server.env, "OMP_NUM_THREADS": "1"}
    with RayCluster(cpus=4, env=env) as cluster:
        yield cluster
