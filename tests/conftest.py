from __future__ import annotations

import os

# Offline and single-threaded: fast and steady on small CI machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
