"""Telling a server that cannot be reached at all from failures that pass.

When nothing listens at ``--base-url`` every request fails the same way, and recording
each image of a large folder as an error (after its retries) helps nobody: the run should
stop at once with one line. A failure later in a run, after the server answered, passes
by itself (a restart, a dropped connection) and is recorded for ``--retry-errors``.

The rule (:class:`ReachWatch`): the run stops when its first :data:`FIRST_REQUESTS`
requests all failed to connect and none ever succeeded; a run with fewer requests stops
when all of them failed to connect. Until that is decided the failed images are held
back, so a stopped run records nothing. Any answer from the server (a result, or an HTTP
error, which the server sent) decides that it can be reached, for the rest of the run.

What counts as a failure to connect (:func:`connection_failure`): a
``grounding.backends.remote.RemoteError`` without an HTTP ``status`` whose ``connection``
attribute is true (the remote backend sets it when no connection could be made: refused,
host not found, connect timeout). An error without that attribute is read from its
message ("cannot connect to ...", "connection refused", "host not found").
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from typing import Any

from grounding.backends.remote.retry import RemoteError
from grounding.core.errors import GroundingError
from grounding.core.result import Result
from grounding.pipeline.detector import Detector

FIRST_REQUESTS = 3
"""How many requests, all failing to connect with none answered, stop a run."""

CONNECTION_FLAGS = ("connection",)
"""The RemoteError attribute (a bool) saying that no connection could be made."""

_CANNOT_CONNECT = re.compile(
    r"cannot connect|cannot reach|connection refused|connect call failed|host not found|"
    r"name or service not known|nodename nor servname|no route to host|"
    r"network is unreachable", re.IGNORECASE)
"""What a failure to connect says, for an error that carries no flag."""

_REASON = re.compile(r"cannot connect to \S+?: (.+?)(?: \(gave up after [^)]*\))?$")


class ServerUnreachable(GroundingError):
    """No request of the run could connect to the server: nothing was recorded."""


def connection_failure(out: object) -> bool:
    """Whether a backend's result ``out`` is a failure to connect to the server at all
    (see the module's docstring): never an answer, an HTTP error or a timeout."""
    if not isinstance(out, RemoteError) or getattr(out, "status", None) is not None:
        return False
    for name in CONNECTION_FLAGS:
        flag = getattr(out, name, None)
        if isinstance(flag, bool):
            return flag
    return bool(_CANNOT_CONNECT.search(str(out)))


def reason(error: BaseException) -> str:
    """Why a connection failed, in a few words ("connection refused")."""
    text = str(error).strip()
    found = _REASON.search(text)
    if found:
        return found.group(1)
    if "refused" in text.lower():
        return "connection refused"
    return text


class _Watched:
    """A backend whose every result passes a ReachWatch; everything else is the
    backend's own (a backend without ``stream`` still has none)."""

    def __init__(self, backend: Any, watch: ReachWatch) -> None:
        self._backend = backend
        self._watch = watch

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._backend, name)
        if name == "generate":
            def generate(requests):
                outputs = value(requests)
                for out in outputs:
                    self._watch.see(out)
                return outputs
            return generate
        if name == "stream":
            def stream(requests):
                for out in value(requests):
                    self._watch.see(out)
                    yield out
            return stream
        return value


class ReachWatch:
    """Watches the requests of one run for a server that cannot be reached (see the
    module's docstring): :meth:`watching` gives the detector to run, :meth:`guard` the
    results to record."""

    def __init__(self, backend: Any, first: int = FIRST_REQUESTS) -> None:
        self.url = getattr(backend, "base_url", None)
        self.first = max(1, first)
        self.failures: list[BaseException] = []
        self.reached = False

    def see(self, out: object) -> None:
        """Count one result of the backend."""
        if self.reached:
            return
        if connection_failure(out):
            self.failures.append(out)  # type: ignore[arg-type]
        else:
            self.reached = True

    @property
    def unreachable(self) -> bool:
        return not self.reached and len(self.failures) >= self.first

    def error(self) -> ServerUnreachable:
        where = self.url or "the server"
        n = len(self.failures)
        first = "the only request" if n == 1 else f"the first {n} requests"
        return ServerUnreachable(f"cannot reach {where}: {reason(self.failures[0])} ({first} "
                                 "could not connect; nothing was recorded)")

    def watching(self, detector: Detector) -> Detector:
        """A copy of ``detector`` whose backend reports every result here."""
        watched = copy.copy(detector)
        watched.backend = _Watched(detector.backend, self)
        return watched

    def guard(self, results: Iterable[Result]) -> Iterator[Result]:
        """``results`` in order; failed ones are held back until the server is known to
        answer. Raises ServerUnreachable (dropping what was held back) when it is not."""
        held: list[Result] = []
        for result in results:
            if self.unreachable:
                raise self.error()
            if result.error is None:
                self.reached = True
            if not self.reached:
                held.append(result)
                continue
            yield from held
            held.clear()
            yield result
        if self.failures and not self.reached:
            raise self.error()
        yield from held


_STORAGE_DOWN = re.compile(
    r"NETWORK_CONNECTION|curlCode: (6|7|28)\b|could not resolve host|could not connect to "
    r"server|connection refused|name or service not known|no route to host", re.IGNORECASE)
"""What an image read says when its storage (an S3 endpoint, a bucket's host) cannot be
reached at all, rather than one object being missing or unreadable."""


class StorageUnreachable(GroundingError):
    """The first images of a run all failed to reach their storage: nothing was recorded."""


class StorageWatch:
    """The same rule as :class:`ReachWatch` for the images' storage: when the first
    FIRST_REQUESTS images of a session all fail because their storage cannot be reached
    (a dead AWS_ENDPOINT_URL, a worker without the endpoint in its environment), the run
    stops with one line instead of recording every image as an error. Until that is
    decided, such failures are held back; any image read (labelled, or failing for
    another reason) decides that the storage answers, and the held ones pass."""

    def __init__(self, first: int = FIRST_REQUESTS) -> None:
        self.first = max(1, first)
        self.held: list[dict] = []
        self.reached = False

    def see(self, record: dict) -> list[dict]:
        """The records to write now (in order); raises StorageUnreachable."""
        error = record.get("error")
        if not self.reached and error and _STORAGE_DOWN.search(str(error)):
            self.held.append(record)
            if len(self.held) >= self.first:
                raise self.error()
            return []
        self.reached = True
        out, self.held = [*self.held, record], []
        return out

    def finish(self) -> None:
        """At the end of the session: a run whose every image failed so stops too."""
        if self.held and not self.reached:
            raise self.error()

    def error(self) -> StorageUnreachable:
        n = len(self.held)
        first = "the only image" if n == 1 else f"the first {n} images"
        return StorageUnreachable(
            f"cannot read the images: {self.held[0]['error']} ({first} could not reach "
            "their storage; nothing was recorded; check the endpoint and credentials in "
            "the environment of every process that reads them, Ray workers included)")
