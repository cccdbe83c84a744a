from __future__ import annotations

import os

# Offline and single-threaded: fast and steady on small CI machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Servers started once per test session (by the first test that asks for them).
from tests.label_studio_server import label_studio_server  # noqa: F401
from tests.ray_cluster import ray_cluster  # noqa: F401
from tests.s3_server import s3_server  # noqa: F401
