"""Label on a Ray cluster: the same records as a plain run, the work spread with Ray Data.

The driver (the ``grounding label`` process) keeps the run directory: it lists what is
missing, and appends each record as it streams back, exactly as a plain run does
(grounding.runs.labeling). Ray Data does the rest:

* the images still to do become a dataset of (key, location) rows;
* reading and decoding (EXIF turn, RGB) run as Ray tasks on CPUs (:func:`decode`), so
  workers never wait on storage or JPEG decoding;
* the model runs in a fixed pool of actors (:class:`Labeller`, ``map_batches``), each
  building its own detector once (one per GPU with a local model; with a server, actors
  drive it and share its capacity);
* results stream back as JSON records, in the order they finish.

Failures: an image that cannot be read or asked about is an error record, never a failed
job. A worker process that dies loses its batch in flight, which Ray runs again on a
restarted actor (Ray Data's actors restart and retry by default); a batch delivered twice
is written once (the driver skips a key it has written). A driver that dies loses nothing
on disk: run the same command again, and only what is missing is labelled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grounding.core.errors import GroundingError
from grounding.io.images import Named, load_image
from grounding.pipeline.detector import Detector
from grounding.pipeline.parts import failed
from grounding.pipeline.query import Query
from grounding.runs.reach import ReachWatch, ServerUnreachable

__all__ = ["RayEngine", "RayUnavailable", "decode", "require_ray"]

READ_CPUS = 0.5
"""Logical CPUs one read-and-decode task asks for."""
MODEL_CPUS = 1.0
"""Logical CPUs an actor running a model asks for (beside its GPUs)."""
SERVER_CPUS = 0.25
"""Logical CPUs an actor driving a server asks for: it mostly waits on the network."""
SERVER_SHARE = 8
"""Requests in flight per actor driving a server, when --workers is not given: the pool
has one actor per this many of the server's --concurrency."""

INSTALL = "pip install 'grounding[ray]'"


def server_workers(concurrency: int) -> int:
    """The default pool driving a server of ``concurrency`` requests in flight: one
    actor per SERVER_SHARE of them."""
    return max(1, math.ceil(concurrency / SERVER_SHARE))


class RayUnavailable(GroundingError):
    """Ray (with Ray Data) is not installed, or the cluster cannot take the pool."""


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or RayUnavailable saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayUnavailable(f"--engine ray needs Ray Data: {INSTALL}") from None
    return ray


TOKEN_HINT = (" (a cluster with token authentication, Ray's default, needs its token on "
              "this machine too: RAY_AUTH_TOKEN, or the head's ~/.ray/auth_token copied here)")


def check_address(address: str | None) -> None:
    """RayUnavailable, in seconds, for an address nothing answers at: ``ray.init`` would
    retry a dead address for many minutes."""
    if address in (None, "auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--ray-address {address}: expected HOST:PORT, "
                             "ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: "
                             f"{exc.strerror or exc}") from None


def use_token() -> None:
    """Authenticate with the cluster's token when this machine has one and the mode is
    unset: Ray reads ~/.ray/auth_token for ``auto`` but not for an address given."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            Path("~/.ray/auth_token").expanduser().is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def decode(row: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: read and decode one image (upright RGB pixels), or say why not in
    ``error`` (an image that cannot be read is a record, never a failed task)."""
    try:
        pixels = np.asarray(load_image(row["location"]))
        error = ""
    except Exception as exc:  # one unreadable image among millions is a record
        error = str(exc) if isinstance(exc, GroundingError) else (
            f"cannot load image {row['location']}: {type(exc).__name__}: {exc}")
        pixels = np.zeros((0, 0, 3), np.uint8)
    return {"image": row["image"], "location": row["location"], "pixels": pixels,
            "error": error}


class Labeller:
    """One actor of the pool: builds its detector once, then labels batches of decoded
    images into records (JSON text), as the plain run's detector does.

    ``watch``: a server that no request of this actor could ever reach makes the whole
    batch ``unreachable`` (grounding.runs.reach), which the driver turns into the same
    one-line stop as a plain run, recording nothing."""

    def __init__(self, build: Callable[[], Detector], query: Query) -> None:
        self.detector = build()
        self.query = query
        self.watch = ReachWatch(self.detector.backend)
        self.watched = self.watch.watching(self.detector)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        keys = [str(k) for k in batch["image"]]
        records: dict[str, str] = {}
        good: list[tuple[str, Named]] = []
        backend = self.detector.backend
        for key, location, pixels, error in zip(keys, batch["location"], batch["pixels"],
                                                batch["error"], strict=True):
            if error:
                records[key] = failed(key, None, backend, str(error)).to_json()
            else:
                image = load_image(np.asarray(pixels))
                good.append((key, Named(str(location), image)))
        unreachable = ""
        if good:
            results = self.watch.guard(self.watched.detect_query([g for _, g in good],
                                                                 self.query))
            try:
                for (key, _), result in zip(good, results, strict=True):
                    result.image = key
                    records[key] = result.to_json()
            except ServerUnreachable as exc:
                unreachable = str(exc)
                self._fail_rest(good, records, unreachable)
            except Exception as exc:  # never a failed job: the batch's images are errors
                self._fail_rest(good, records, f"{type(exc).__name__}: {exc}")
            finally:
                results.close()
        return {"image": keys, "record": [records[k] for k in keys],
                "unreachable": [unreachable] * len(keys)}


    def _fail_rest(self, good: list[tuple[str, Named]], records: dict[str, str],
                   error: str) -> None:
        for key, named in good:
            if key not in records:
                records[key] = failed(key, None, self.detector.backend,
                                      f"{named.name}: {error}").to_json()


@dataclass
class Pool:
    """The actor pool a run gets on a cluster."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    batch_size: int


@dataclass
class RayEngine:
    """Run a label run's model on a Ray cluster (see the module's docstring).

    ``build`` makes the detector in each actor (it must pickle: a ``functools.partial``
    of importable functions); the driver's own detector only plans and records the run.
    ``address``: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``) or
    ``local`` (a new Ray on this machine); None does what ``ray.init()`` does: the
    cluster RAY_ADDRESS names, else one ``ray start`` runs on this machine, else a new
    local Ray. ``workers``: actors
    in the pool (default: one per GPU with a local model; one per SERVER_SHARE requests
    of a server's --concurrency). ``gpus_per_worker``: default 1 with a local model on a
    cluster with GPUs, else 0. ``batch_size``: images per actor call (default: the
    detector's; twice the actor's share of a server's requests)."""

    build: Callable[[], Detector]
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    batch_size: int | None = None

    def pool(self, detector: Detector, resources: dict[str, float]) -> Pool:
        """The pool for ``detector`` on a cluster with ``resources``
        (``ray.cluster_resources()``); RayUnavailable when the cluster cannot hold it
        (Ray would wait for resources that never come)."""
        serves = hasattr(detector.backend, "stream")
        gpus = float(resources.get("GPU", 0))
        cpus = float(resources.get("CPU", 0))
        per_gpu = self.gpus_per_worker
        if per_gpu is None:
            per_gpu = 1.0 if gpus >= 1 and not serves else 0.0
        if per_gpu < 0:
            raise RayUnavailable(f"--gpus-per-worker {per_gpu}: give 0 or more")
        concurrency = int(getattr(detector.backend, "concurrency", 1) or 1)
        workers = self.workers
        if workers is None:
            if serves:
                workers = server_workers(concurrency)
            elif per_gpu > 0:
                workers = max(1, int(gpus // per_gpu))
            else:
                workers = 1
        if workers < 1:
            raise RayUnavailable(f"--workers {workers}: give 1 or more")
        if workers * per_gpu > gpus:
            raise RayUnavailable(
                f"{workers} workers x {per_gpu:g} GPUs need {workers * per_gpu:g} GPUs; the "
                f"Ray cluster has {gpus:g} (lower --workers or --gpus-per-worker)")
        per_cpu = SERVER_CPUS if serves else MODEL_CPUS
        if workers * per_cpu + READ_CPUS > cpus:
            raise RayUnavailable(
                f"{workers} workers need {workers * per_cpu + READ_CPUS:g} CPUs with the "
                f"image readers; the Ray cluster has {cpus:g} (lower --workers)")
        size = self.batch_size or detector.batch_size
        if serves and self.batch_size is None:
            size = 2 * math.ceil(concurrency / workers)
        return Pool(workers, per_gpu, per_cpu, max(1, size))

    def records(self, detector: Detector, query: Query,
                items: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        """One record per item, as they finish (grounding.runs.labeling.Engine)."""
        ray = require_ray()
        # Ray's driver prints cluster events ("a worker died ...") on stdout, where the
        # command writes its summary: they go to stderr while the job runs.
        with contextlib.redirect_stdout(sys.stderr):
            yield from self._session(ray, detector, query, items)

    def _session(self, ray: Any, detector: Detector, query: Query,
                 items: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        started = not ray.is_initialized()
        if started:
            check_address(self.address)
            use_token()
            try:
                # Workers' own output stays in Ray's logs: a failure reaches the driver
                # as an exception, told here in one line.
                ray.init(address=self.address, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = self.address or "a local Ray"
                raise RayUnavailable(f"cannot start or join {where}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else exc}"
                                     f"{TOKEN_HINT if self.address else ''}") from None
        try:
            yield from self._records(ray, detector, query, items)
        finally:
            if started:
                ray.shutdown()

    def _records(self, ray: Any, detector: Detector, query: Query,
                 items: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        pool = self.pool(detector, ray.cluster_resources())
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver draws its own
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # failures: below
        rows = [{"image": key, "location": location} for key, location in items]
        dataset = (
            ray.data.from_items(rows)
            .map(decode, num_cpus=READ_CPUS)
            .map_batches(Labeller, fn_constructor_kwargs={"build": self.build,
                                                          "query": query},
                         batch_size=pool.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=pool.workers),
                         num_cpus=pool.cpus_per_worker, num_gpus=pool.gpus_per_worker)
        )
        reached = False
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for record, unreachable in zip(batch["record"], batch["unreachable"],
                                               strict=True):
                    if unreachable and not reached:  # nothing of the run could connect
                        raise ServerUnreachable(str(unreachable))
                    reached = reached or not unreachable
                    yield json.loads(str(record))
        except ray.exceptions.RayError as exc:
            raise RayUnavailable(f"the Ray job failed: {_first_line(exc)} (workers' logs: "
                                 "the Ray session's logs folder, /tmp/ray/session_latest/"
                                 "logs on its head node)") from None


def _first_line(exc: BaseException) -> str:
    """The worker's own error from a Ray exception (its last line, without the module
    path of grounding's errors, which are written for people)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip()
    line = text.splitlines()[-1] if text else type(exc).__name__
    return re.sub(r"^grounding(\.\w+)*\.\w+: ", "", line)
