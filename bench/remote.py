"""Remote backend throughput against a server with a fixed latency: does the client keep
``concurrency`` requests in flight, or is it the bottleneck?

    python bench/remote.py                        # latency 1 s, concurrency 1 4 16 64
    python bench/remote.py --latency 0.5 --concurrency 8 32 --images 400

The server is grounding.testing.loopback.LoopbackServer on 127.0.0.1, in a child process so that
its work does not share the client's GIL (``--in-process``: in a thread of this process):
every answer takes ``latency`` seconds and at most ``capacity`` = concurrency requests are
served at once, so the best possible rate is concurrency / latency images/s.
The client (Detector + OpenAIBackend: resize, JPEG encode, HTTP, parse) must reach at
least 90% of it. A minimal raw-socket client is run against the same server too: its share
of the ideal is the server's ceiling, so a shortfall of the real client is the client's.

The default latency, 1 s, is a fast answer from a loaded VLM server: Qwen2.5-VL writes a
box in about 30-40 tokens, and a vLLM batch of 64 decodes a few dozen tokens per second
per request. A second table then asks for more than one client process can give: the
largest concurrency at ``--stress-latency`` (0.2 s: 320 images/s at 64), where the
client's own cost per request shows (reported, not held to the target).

Where the client's time goes (every thread; the server process is not sampled)::

    pip install py-spy
    py-spy record -f raw -o profile.txt --threads -- python bench/remote.py --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import time
from importlib import metadata

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from grounding.backends.remote.client import OpenAIBackend
from grounding.pipeline.detector import Detector
from grounding.testing.loopback import LoopbackServer, fixed_handler

TARGET = 0.90
SIDE = 224  # a multiple of 28 inside the budget below: the client sends it as it is


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """Small gray pictures with a red rectangle in a different place each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.full((SIDE, SIDE, 3), 128, np.uint8)
        x, y = rng.integers(0, SIDE // 2, 2)
        a[y : y + SIDE // 3, x : x + SIDE // 3] = (255, 0, 0)
        out.append(Image.fromarray(a))
    return out


def _serve(conn, latency: float, jitter: float, capacity: int) -> None:
    """Child process: run a LoopbackServer until told to stop; report its counters."""
    with LoopbackServer(handler=fixed_handler(), latency=latency, jitter=jitter,
                        capacity=capacity, record=False) as server:
        conn.send(server.base_url)
        while True:
            command = conn.recv()
            if command == "reset":
                server.reset()
                conn.send(None)
            elif command == "stats":
                conn.send({"calls": server.calls, "max_in_flight": server.max_in_flight})
            else:
                return


class ServerProcess:
    """A LoopbackServer in a child process, with the in-thread server's counters."""

    def __init__(self, latency: float, jitter: float, capacity: int) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, latency, jitter, capacity),
                                    daemon=True)

    def __enter__(self) -> ServerProcess:
        self._process.start()
        self.base_url = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._process.join(5)

    def reset(self) -> None:
        self._conn.send("reset")
        self._conn.recv()

    def _stats(self) -> dict[str, int]:
        self._conn.send("stats")
        return self._conn.recv()

    @property
    def calls(self) -> int:
        return self._stats()["calls"]

    @property
    def max_in_flight(self) -> int:
        return self._stats()["max_in_flight"]


async def _raw_client(base_url: str, body: bytes, concurrency: int, n: int) -> None:
    """``concurrency`` keep-alive connections, each POSTing ``body`` back to back: about the
    least work a Python client can do per request."""
    host, port = base_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    request = head.encode("ascii") + body

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in range(count):
            writer.write(request)
            await writer.drain()
            lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()

    counts = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
    await asyncio.gather(*(connection(k) for k in counts))


def _server(concurrency: int, latency: float, jitter: float, in_process: bool):
    """The fixed-latency server, in a thread of this process or in a child process."""
    if in_process:
        return LoopbackServer(handler=fixed_handler(), latency=latency, jitter=jitter,
                              capacity=concurrency, record=False)
    return ServerProcess(latency, jitter, concurrency)


def server_ceiling(concurrency: int, latency: float, n: int, image: Image.Image, *,
                   jitter: float = 0.0, in_process: bool = False) -> float:
    """images/s a minimal raw-socket client gets from the same server: what the server
    allows, so a shortfall of the real client is the client's."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    body = json.dumps({"model": "m", "max_tokens": 2048, "logprobs": True, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "the red box"}]}]}).encode()
    with _server(concurrency, latency, jitter, in_process) as server:
        t0 = time.perf_counter()
        asyncio.run(_raw_client(server.base_url, body, concurrency, n))
        return n / (time.perf_counter() - t0)


def run(concurrency: int, latency: float, n: int, imgs: list[Image.Image], *,
        jitter: float = 0.0, in_process: bool = False) -> dict[str, float]:
    with _server(concurrency, latency, jitter, in_process) as server:
        backend = OpenAIBackend("loopback-qwen2.5-vl", base_url=server.base_url,
                                dialect="qwen2.5-vl", concurrency=concurrency,
                                min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE,
                                max_retries=0, timeout=60.0)
        detector = Detector(backend)
        # Warm up: one request per slot, so every connection is open before the clock starts.
        list(detector.detect_many([imgs[i % len(imgs)] for i in range(concurrency)],
                                  prompt="the red box"))
        server.reset()
        work = [imgs[i % len(imgs)] for i in range(n)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = list(detector.detect_many(work, prompt="the red box"))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        backend.close()
        errors = [r.error for r in results if r.error]
        if errors:
            raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
        encode = sum(r.generation.timings.get("preprocess", 0.0) for r in results)
        out = {"wall": wall, "rate": n / wall, "ideal": concurrency / latency,
               "max_in_flight": server.max_in_flight, "cpu_ms": 1000 * cpu / n,
               "encode_ms": 1000 * encode / n, "calls": server.calls}
    return out


def measure(concurrency: int, latency: float, args: argparse.Namespace,
            imgs: list[Image.Image]) -> dict[str, float]:
    n = args.images or max(8, round(args.seconds * concurrency / latency))
    row = run(concurrency, latency, n, imgs, jitter=args.jitter, in_process=args.in_process)
    row["n"] = n
    row["ceiling"] = server_ceiling(concurrency, latency, n, imgs[0], jitter=args.jitter,
                                    in_process=args.in_process)
    return row


def table(title: str, rows: dict[int, dict[str, float]], console: Console) -> list[int]:
    """Print the rows; the concurrencies below the target."""
    out = Table(title=title)
    for col in ("concurrency", "images", "wall s", "images/s", "ideal C/L", "% of ideal",
                ">= 90%", "server max in flight", "raw client % of ideal", "client CPU ms/img",
                "encode ms/img"):
        out.add_column(col, justify="right")
    failed = []
    for c, r in rows.items():
        share = r["rate"] / r["ideal"]
        ok = share >= TARGET
        if not ok:
            failed.append(c)
        out.add_row(str(c), str(r["n"]), f"{r['wall']:.2f}", f"{r['rate']:.1f}",
                    f"{r['ideal']:.1f}", f"{100 * share:.1f}%",
                    "[green]yes[/]" if ok else "[red]NO[/]", str(r["max_in_flight"]),
                    f"{100 * r['ceiling'] / r['ideal']:.1f}%", f"{r['cpu_ms']:.2f}",
                    f"{r['encode_ms']:.2f}")
    console.print(out)
    return failed


def encode_costs(console: Console, repeat: int = 5) -> None:
    """What one image costs to send, by format: resize to the model frame + encode +
    base64, on the sample photos (the client's CPU per image beyond the HTTP)."""
    from pathlib import Path

    from grounding.backends.remote.codec import _encode
    from grounding.core.dialects import get_dialect
    from grounding.core.geometry import model_frame, resolve_budget
    from grounding.io.images import load_image

    dialect = get_dialect("qwen2.5-vl")
    low, high = resolve_budget(dialect, None, None)
    out = Table(title="Sending one photo: resize to the Qwen2.5-VL frame (default budget), "
                      "encode, base64")
    for col in ("image", "frame", "PNG ms", "PNG KB", "JPEG ms", "JPEG KB"):
        out.add_column(col, justify="right")
    for path in sorted(Path(__file__).parent.parent.glob("assets/images/*.jpg")):
        image = load_image(path)
        frame = model_frame(dialect, *image.size, min_pixels=low, max_pixels=high)
        cells = []
        for fmt in ("png", "jpeg"):
            best, url = float("inf"), ""
            for _ in range(repeat):
                t0 = time.perf_counter()
                url = _encode(image, frame, fmt)
                best = min(best, time.perf_counter() - t0)
            cells += [f"{1000 * best:.1f}", f"{len(url) / 1024:.0f}"]
        out.add_row(path.name, f"{frame[0]}x{frame[1]}", *cells)
    console.print(out)


def _version(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"no {package}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="server seconds per answer")
    parser.add_argument("--stress-latency", type=float, default=0.2,
                        help="latency of the capacity table (0: skip it)")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="server latency varies uniformly by plus or minus this")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--images", type=int, default=None,
                        help="images per run (default: --seconds of ideal throughput)")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="target run length when --images is not given")
    parser.add_argument("--in-process", action="store_true",
                        help="run the server in a thread of this process (shares the GIL)")
    parser.add_argument("--encode-only", action="store_true",
                        help="only the table of what encoding one photo costs")
    args = parser.parse_args()

    console = Console(width=150)
    versions = ", ".join(_version(p) for p in ("openai", "aiohttp", "httpx2", "pillow"))
    console.print(f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {versions}")
    encode_costs(console)
    if args.encode_only:
        return
    where = "a thread of this process" if args.in_process else "a child process"
    spread = f" +- {args.jitter:g}" if args.jitter else ""
    console.print(f"server: LoopbackServer in {where}, latency {args.latency:g}{spread} s, "
                  f"capacity = concurrency; images {SIDE}x{SIDE}, sent unresized as JPEG")
    imgs = images(32)
    rows = {c: measure(c, args.latency, args, imgs) for c in args.concurrency}
    failed = table(f"OpenAIBackend through Detector.detect_many, server latency "
                   f"{args.latency:g} s", rows, console)
    console.print("raw client: a minimal keep-alive socket client against the same server (the "
                  "server's ceiling); client CPU ms/img: this process's CPU time per image (with "
                  "--in-process, the server's too); encode ms/img: resize + JPEG + base64 wall "
                  "time per image, waits for the GIL included.")
    if args.stress_latency > 0:
        c = max(args.concurrency)
        stress = {c: measure(c, args.stress_latency, args, imgs)}
        table(f"Client capacity (reported, not held to the target): server latency "
              f"{args.stress_latency:g} s", stress, console)
        rate = stress[c]["rate"]
        console.print(f"At {c / args.stress_latency:.0f} images/s asked, one client process "
                      f"gave {rate:.0f}/s ({stress[c]['cpu_ms']:.2f} ms of CPU per image): a "
                      "server faster than that needs more client processes "
                      "(grounding label --shard).")
    if failed:
        console.print(f"[red]below {TARGET:.0%} of ideal at concurrency {failed}[/]")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
