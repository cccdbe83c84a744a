"""`grounding label --engine ray` against a plain run: what Ray costs, at start and per image.

    python bench/ray.py                                  # 64 images, latency 0.2 s, C = 8
    python bench/ray.py --images 256 --latency 0.5 --concurrency 16

Every run is the real command (``python -m grounding label ... --backend openai``) in a
subprocess, as a user runs it, against grounding.testing.loopback.LoopbackServer (a
perfect Qwen2.5-VL that finds the red box) on 127.0.0.1: each answer takes ``--latency``
seconds, and the server takes far more requests at once than any run sends, so a run's
best possible rate is concurrency / latency images/s. Compared, at the same total
``--concurrency`` C (the CLI divides a server's concurrency among Ray workers):

* plain ``label`` (LocalEngine: this process drives the server);
* ``--engine ray --workers 1`` and ``--workers 2``, joining ONE local Ray cluster this
  bench starts itself (``ray start --head --block --num-cpus=4``, token authentication as
  Ray 2.5x+ starts clusters, the same token given to the drivers) and stops at the end;
* ``--engine ray --workers 2`` with no ``--ray-address``: the driver starts (and stops)
  a Ray of its own, run before the cluster is up; what starting Ray costs a run;
* the same plain / joined runs at latency 0: the server answers at once, so what is left
  is the pipeline's and Ray's own cost per image.

Times are taken from the outside: the bench polls the run's predictions.jsonl, so a
row says when the first record was on disk (process start, imports, Ray start or join,
pool start-up, first batch), when the last one was, and when the process exited (Ray's
shutdown included). A second table times ``ray.init`` alone in a fresh process: joining
the cluster against starting a local Ray.

On a 2-core machine without a GPU this shows Ray's overhead, not a speed-up: the workers,
Ray's own processes (GCS, raylet, Ray Data's executor) and the server share two cores, and
one plain process already keeps C requests in flight. Ray pays off when the model runs in
the workers (one per GPU) or when one client process cannot keep a fast server busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from grounding.testing.cluster import RayCluster
from grounding.testing.loopback import LoopbackServer, grounding_handler

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"  # names the dialect; the loopback server answers
CLASS = "red box"


def red_boxes(root: Path, n: int) -> None:
    """``n`` small PNGs (120-260 x 100-220), one red rectangle each, in two subfolders
    (as tests/test_ray_engine.py)."""
    rng = np.random.default_rng(7)
    for i in range(n):
        w, h = int(rng.integers(120, 260)), int(rng.integers(100, 220))
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        a = np.full((h, w, 3), 200, np.uint8)
        a[y1 : y1 + h // 3, x1 : x1 + w // 3] = (255, 0, 0)
        path = root / f"part{i % 2}" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)


@dataclass
class Row:
    name: str
    latency: float
    wall: float
    first: float
    last: float
    images: int
    at_first: int
    """Records on disk when the first was seen (they come back a batch at a time)."""

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def stream(self) -> float:
        """first to last record: the pipeline once it runs."""
        return self.last - self.first

    @property
    def per_image(self) -> float:
        """Seconds per image after the first record was on disk."""
        rest = self.images - self.at_first
        return self.stream / rest if rest > 0 else float("nan")


def _count(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def label(name: str, images: Path, run: Path, url: str, latency: float, n: int,
          concurrency: int, env: dict[str, str], extra: list[str]) -> Row:
    """One ``grounding label`` in a subprocess, timed from outside by polling its
    predictions.jsonl."""
    command = [sys.executable, "-m", "grounding", "label", str(images), "--classes", CLASS,
               "--out", str(run), "--backend", "openai", "--base-url", url, "--model",
               MODEL, "--concurrency", str(concurrency), *extra]
    predictions = run / "predictions.jsonl"
    log = run.with_suffix(".log")
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err)
        first = last = None
        at_first = 0
        while True:
            done = proc.poll() is not None
            count = _count(predictions)
            now = time.perf_counter() - t0
            if count and first is None:
                first, at_first = now, count
            if count >= n and last is None:
                last = now
            if done:
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        out = proc.stdout.read().decode()
        proc.stdout.close()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}:\n{log.read_text()[-3000:]}")
    summary = json.loads(out)
    if summary["images"] != n or summary.get("errors"):
        raise SystemExit(f"{name}: expected {n} labelled images, got {out[:2000]}")
    return Row(name, latency, wall, first or wall, last or wall, n, at_first)


INIT = """
import sys, time
t0 = time.perf_counter()
import ray, ray.data
t1 = time.perf_counter()
ray.init(address=sys.argv[1] if sys.argv[1] != "-" else None, include_dashboard=False,
         log_to_driver=False, logging_level="WARNING")
t2 = time.perf_counter()
ray.shutdown()
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def ray_init(address: str | None, env: dict[str, str]) -> tuple[float, float, float]:
    """Seconds to import ray + ray.data, ray.init, ray.shutdown, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", INIT, address or "-"], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"ray.init({address}) failed:\n{done.stderr[-2000:]}")
    a, b, c = (float(x) for x in done.stdout.split()[-3:])
    return a, b, c


def _version(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"no {package}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2,
                        help="server seconds per answer (a second set of runs uses 0)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="the server's --concurrency, shared by the Ray workers")
    parser.add_argument("--cluster-cpus", type=int, default=4,
                        help="logical CPUs of the bench's Ray cluster (scheduling only)")
    parser.add_argument("--no-zero", action="store_true", help="skip the latency-0 runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    n, c = args.images, args.concurrency

    versions = ", ".join(_version(p) for p in ("ray", "pyarrow", "openai"))
    print(f"{platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {versions}")
    print(f"{n} PNGs (120-260 x 100-220), LoopbackServer in this process "
          f"(latency {args.latency:g} s, capacity {max(1024, 4 * c)}), "
          f"--concurrency {c}: ideal {c / args.latency:.0f} images/s")
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    root = Path(tempfile.mkdtemp(prefix="gr-bench-ray-"))
    images = root / "images"
    red_boxes(images, n)
    small = root / "small"
    red_boxes(small, max(1, n // 4))  # the first quarter of the same images
    subprocess.run([sys.executable, "-c", "import ray.data, grounding.cli"], env=env,
                   check=True)  # warm the file cache: the first run is not the one paying

    rows: list[Row] = []
    counter = iter(range(1000))

    def go(name: str, server: LoopbackServer, latency: float, extra: list[str],
           folder: Path = images, run_env: dict[str, str] = env) -> None:
        run = root / f"run{next(counter):02d}"
        count = n if folder == images else max(1, n // 4)
        rows.append(label(name, folder, run, server.base_url, latency, count, c, run_env,
                          extra))
        print(f"  {name}, latency {latency:g}, {count} images: {rows[-1].wall:.1f} s",
              file=sys.stderr)

    latencies = [args.latency] if args.no_zero else [args.latency, 0.0]
    servers = {lat: LoopbackServer(handler=grounding_handler("qwen2.5-vl", label=CLASS),
                                   latency=lat, capacity=max(1024, 4 * c), record=False)
               for lat in latencies}
    for s in servers.values():
        s.__enter__()
    try:
        # Before the cluster is up: a driver with no --ray-address starts a Ray of its
        # own. RAY_ADDRESS=local makes sure of it: without, Ray joins the cluster that
        # `ray start` last started on this machine (/tmp/ray/ray_current_cluster), if any.
        alone = {**env, "RAY_ADDRESS": "local"}
        own = ray_init(None, alone)
        go("ray, 2 workers, driver starts Ray", servers[args.latency], args.latency,
           ["--engine", "ray", "--workers", "2"], run_env=alone)
        with RayCluster(cpus=args.cluster_cpus, env=env) as cluster:
            joined = [ray_init(cluster.address, cluster.env) for _ in range(2)]
            on = ["--engine", "ray", "--ray-address", cluster.address]
            engines = [("plain label", []), ("ray, 1 worker, joined", [*on, "--workers", "1"]),
                       ("ray, 2 workers, joined", [*on, "--workers", "2"])]
            for latency in latencies:
                for name, extra in engines:
                    go(name, servers[latency], latency, extra, run_env=cluster.env)
            if not args.no_zero:  # the same at a quarter of the images: cost per image
                for name, extra in engines:
                    go(name, servers[0.0], 0.0, extra, small, run_env=cluster.env)
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    def table(head: list[str], body: list[list[str]]) -> None:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in body:
            print("| " + " | ".join(line) + " |")
        print()

    plain = {(r.latency, r.images): r for r in rows if r.name == "plain label"}
    print(f"\n### grounding label, --concurrency {c}\n")
    body = []
    for r in rows:
        base = plain[(r.latency, r.images)]
        body.append([r.name, f"{r.latency:g}", str(r.images), f"{r.wall:.1f}",
                     f"{r.rate:.1f}", f"{c / r.latency:.0f}" if r.latency else "-",
                     f"{r.first:.1f}", f"{r.stream:.2f}", f"{1000 * r.per_image:.1f}",
                     f"{r.wall - r.last:.1f}",
                     f"{r.wall - base.wall:+.1f}" if r is not base else "-",
                     f"{1000 * (r.wall - base.wall) / r.images:+.0f}"
                     if r is not base else "-"])
    table(["engine", "latency s", "images", "wall s", "images/s", "ideal", "1st record s",
           "1st -> last s", "ms/img after 1st", "exit after last s", "vs plain s",
           "vs plain ms/img"], body)
    print("1st record: process start to the first record on disk (imports, Ray start or "
          "join, pool start-up, first batch); 1st -> last: the rest of the run (ms/img: per "
          "image not yet on disk at the first record); exit after "
          "last: the driver's shutdown (Ray's included); vs plain: the same run's wall "
          "time minus the plain run's at the same latency, in all and per image.\n")

    if not args.no_zero:
        quarter = max(1, n // 4)
        print(f"### Cost per image at latency 0 (wall at {n} minus wall at {quarter}, "
              f"per image)\n")
        body = []
        for name, _ in engines:
            big, little = (next(r for r in rows if r.name == name and r.latency == 0
                                and r.images == k) for k in (n, quarter))
            body.append([name, f"{little.wall:.1f}", f"{big.wall:.1f}",
                         f"{1000 * (big.wall - little.wall) / (n - quarter):.0f}"])
        table(["engine", f"wall s, {quarter} images", f"wall s, {n} images", "ms/img"], body)
        print("Ray's fixed cost varies by seconds from run to run here: a per-image figure "
              "below that noise comes out erratic, even negative; see ms/img after 1st.\n")

    print("### Ray alone, in a fresh process\n")
    table(["", "import ray, ray.data s", "ray.init s", "ray.shutdown s"], [
        ["join the cluster (first driver after `ray start`)", *(f"{x:.2f}" for x in joined[0])],
        ["join the cluster (again)", *(f"{x:.2f}" for x in joined[1])],
        ["start a local Ray", *(f"{x:.2f}" for x in own)]])
    print(f"`ray start --head` (once per cluster): {cluster.startup:.1f} s until its port "
          "answers.\n")
    print("load average at the end: {:.1f} {:.1f} {:.1f} (other work on the machine "
          "moves every figure here)\n".format(*os.getloadavg()))
    print(f"On {os.cpu_count()} CPU cores and no GPU this measures Ray's overhead, not a "
          "speed-up: Ray's processes, the workers and the server share the cores, and one "
          "plain process already keeps the server's concurrency in flight. Ray pays where "
          "the model runs in the workers (a GPU each) or one client process cannot keep a "
          "fast server busy.")

if __name__ == "__main__":
    main()
