"""Detection quality gained by tiling and by duplicate removal, on scenes with a known answer.

    python bench/quality.py                 # 20 images of 4032x3024
    python bench/quality.py --quick         # 4 images, for a quick look
    python bench/quality.py --tiles 3x3 --duplicates 2 --keep /tmp/quality

Generates a set of synthetic photos (grounding.testing.scenes: solid red, green and blue
boxes on a textured grey ground, half of them small: 24-48 px in a 4032x3024 image, a
quarter of them EXIF-rotated) with their COCO ground truth, and serves a perfect but
short-sighted model on 127.0.0.1 (grounding.testing.loopback.scene_handler): it finds
every box of the classes asked in the frame it receives, but only boxes of at least
``--min-size`` pixels (16) on both sides there, and writes each box ``--duplicates`` more
times (1) a pixel or two off, as Qwen-VL models do. Sent whole, a 4032x3024 photo is
scaled to the pixel budget (about 1 Mpx: a third of each side), where every small box
shrinks below 16 px and is missed; a tile is sent at close to full resolution.

Each configuration is a ``grounding label --backend openai`` run over the set, then
``grounding eval --gt truth.json``:

* baseline: the whole image, duplicates kept (``--no-dedup``);
* dedup: the whole image, duplicates removed (the default);
* tiles: ``--tiles auto`` (or ``--tiles COLSxROWS``), duplicates kept;
* tiles+dedup; tiles+full+dedup: ``--tiles-with-full`` (the whole image too).

The table: requests the server answered, boxes kept, duplicates dropped (records'
``dropped.duplicate``), boxes fused into others across tiles (``dropped.fused``),
precision, recall and F1 at IoU 0.5 and mAP from the eval, seconds of the label
command (a fresh process each: about 2 s of it is start-up). Recall
gained by tiling and precision gained by dedup are printed under it. A configuration
whose flags this grounding does not have yet is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CLASSES = ["red box", "green box", "blue box"]


@dataclass
class Config:
    kind: str
    """baseline, dedup, tiles, tiles+dedup or tiles+full+dedup."""
    name: str
    flags: list[str]


@dataclass
class Row:
    kind: str
    name: str
    skipped: str | None = None
    requests: int = 0
    images: int = 0
    errors: int = 0
    boxes: int = 0
    duplicates: int = 0
    fused: int = 0
    truncated: int = 0
    repetition: int = 0
    precision: float | None = None
    recall: float | None = None
    map50: float | None = None
    map50_95: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None or p + r == 0:
            return None
        return 2 * p * r / (p + r)


def configurations(tiles: str) -> list[Config]:
    grid = ["--tiles", tiles]
    return [
        Config("baseline", "baseline", ["--no-dedup"]),
        Config("dedup", "dedup", []),
        Config("tiles", f"tiles {tiles}", [*grid, "--no-dedup"]),
        Config("tiles+dedup", f"tiles {tiles}+dedup", grid),
        Config("tiles+full+dedup", f"tiles {tiles}+full+dedup", [*grid, "--tiles-with-full"]),
    ]


def grounding(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grounding", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def known_flags() -> str:
    """``grounding label --help``, to tell which configurations can run."""
    return grounding("label", "--help", timeout=120).stdout


def missing(config: Config, help_text: str) -> list[str]:
    return [f for f in config.flags if f.startswith("--") and f not in help_text]


def make_data(root: Path, n: int, size: tuple[int, int], objects: int, small: tuple[int, int],
              large: tuple[int, int], exif: bool, seed: int):
    from grounding.testing.scenes import scenes, write_dataset

    orientations = (1, 1, 6, 1, 1, 3, 1, 8) if exif else (1,)
    return write_dataset(root, scenes(n, *size, objects, seed=seed, sizes=[small, large]),
                         quality=95, orientations=orientations)


def run_config(config: Config, data, server, base_url: str, out: Path, args) -> Row:
    row = Row(config.kind, config.name)
    run_dir = out / config.name.replace(" ", "_").replace("+", "_")
    server.reset()
    command = ["label", str(data.images_dir), "--out", str(run_dir),
               "--classes", ",".join(CLASSES), "--backend", "openai", "--base-url", base_url,
               "--model", f"loopback-{args.dialect}", "--dialect", args.dialect,
               "--concurrency", str(args.concurrency), "--no-logprobs", "--force",
               *config.flags]
    if args.max_pixels:
        command += ["--max-pixels", str(args.max_pixels)]
    started = time.perf_counter()
    done = grounding(*command)
    row.seconds = time.perf_counter() - started
    row.requests = server.calls
    if done.returncode != 0:
        row.skipped = f"label failed ({done.returncode}): {last_line(done.stderr)}"
        return row
    records = [json.loads(line) for line in
               (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    row.images = len(records)
    for record in records:
        row.boxes += len(record.get("detections") or [])
        dropped = record.get("dropped") or {}
        row.duplicates += int(dropped.get("duplicate", 0))
        row.fused += int(dropped.get("fused", 0))
        row.truncated += bool(record.get("truncated"))
        row.repetition += bool(record.get("repetition"))
    errors = run_dir / "errors.jsonl"
    if errors.exists():
        row.errors = sum(1 for line in errors.read_text(encoding="utf-8").splitlines()
                         if line.strip())
    scored = grounding("eval", str(run_dir), "--gt", str(data.truth), "--json")
    if scored.returncode != 0:
        row.problems.append(f"eval failed: {last_line(scored.stderr)}")
        return row
    report = json.loads(scored.stdout)
    row.precision, row.recall = report["precision"], report["recall"]
    row.map50, row.map50_95 = report["map50"], report["map50_95"]
    if report["images_matched"] != data_images(data):
        row.problems.append(f"eval scored {report['images_matched']} of {data_images(data)} "
                            f"images ({', '.join(report['examples'][:2])})")
    return row


def data_images(data) -> int:
    return len(data.files)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def table(rows: list[Row], title: str):
    from rich.table import Table

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    t = Table(title=title)
    for name in ("configuration", "requests", "boxes", "dup. dropped", "fused", "precision",
                 "recall", "F1", "mAP50", "mAP50:95", "seconds"):
        t.add_column(name, justify="left" if name == "configuration" else "right")
    for r in rows:
        if r.skipped:
            t.add_row(r.name, str(r.requests) if r.requests else "-", *["-"] * 8,
                      f"{r.seconds:.1f}" if r.requests else "-", style="dim")
            continue
        t.add_row(r.name, str(r.requests), str(r.boxes), str(r.duplicates), str(r.fused),
                  f(r.precision), f(r.recall), f(r.f1), f(r.map50), f(r.map50_95),
                  f"{r.seconds:.1f}")
    return t


def gains(rows: list[Row]) -> list[str]:
    by = {r.kind: r for r in rows if not r.skipped and r.precision is not None}
    base, dedup, tiles = by.get("baseline"), by.get("dedup"), by.get("tiles")
    both, full = by.get("tiles+dedup"), by.get("tiles+full+dedup")
    lines = []
    if base and dedup:
        lines.append(f"dedup: precision {base.precision:.3f} -> {dedup.precision:.3f} "
                     f"({dedup.precision - base.precision:+.3f}), "
                     f"{dedup.duplicates} duplicates dropped")
    if base and tiles:
        lines.append(f"tiling: recall {base.recall:.3f} -> {tiles.recall:.3f} "
                     f"({tiles.recall - base.recall:+.3f}), {tiles.requests} requests "
                     f"instead of {base.requests}")
    for other in (both, full):
        if base and other and base.f1 is not None and other.f1 is not None:
            lines.append(f"{other.name}: F1 {base.f1:.3f} -> {other.f1:.3f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 images instead of 20 (the same size)")
    parser.add_argument("--images", type=int, default=None, help="images (default 20)")
    parser.add_argument("--size", default="4032x3024", help="image size WxH")
    parser.add_argument("--objects", type=int, default=16,
                        help="objects per image, half small and half large (default 16)")
    parser.add_argument("--small", default="24-48", help="small object sides, px")
    parser.add_argument("--large", default="150-600", help="large object sides, px")
    parser.add_argument("--no-exif", dest="exif", action="store_false",
                        help="no EXIF-rotated images (default: a quarter of them)")
    parser.add_argument("--dialect", default="qwen2.5-vl")
    parser.add_argument("--min-size", type=int, default=16,
                        help="the model sees boxes at least this many px in its frame")
    parser.add_argument("--duplicates", type=int, default=1,
                        help="the model writes each box this many more times")
    parser.add_argument("--tiles", default="auto", help="the grid: auto or COLSxROWS")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="the pixel budget (default: the dialect's)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only these: baseline dedup tiles tiles+dedup "
                             "tiles+full+dedup")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the images and runs here and keep them")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    n = args.images or (4 if args.quick else 20)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    small = tuple(int(v) for v in args.small.split("-"))
    large = tuple(int(v) for v in args.large.split("-"))

    from rich.console import Console

    from grounding.testing.loopback import LoopbackServer, scene_handler

    console = Console() if sys.stdout.isatty() else Console(width=150)  # a log: no wrap
    help_text = known_flags()
    configs = configurations(args.tiles)
    if args.only:
        configs = [c for c in configs if c.kind in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data = make_data(out / "data", n, size, args.objects, small, large, args.exif,
                         args.seed)
        console.print(f"{n} images of {size[0]}x{size[1]}, {data.objects} objects "
                      f"(sides {small[0]}-{small[1]} and {large[0]}-{large[1]} px) in "
                      f"{time.perf_counter() - started:.1f} s: {data.images_dir}")
        handler = scene_handler(args.dialect, min_size=args.min_size,
                                duplicates=args.duplicates)
        rows = []
        with LoopbackServer(handler=handler, models=[f"loopback-{args.dialect}"],
                            record=False) as server:
            for config in configs:
                absent = missing(config, help_text)
                if absent:
                    rows.append(Row(config.kind, config.name,
                                    skipped=f"no {', '.join(absent)} yet"))
                    continue
                row = run_config(config, data, server, server.base_url, out, args)
                rows.append(row)
                console.print(f"  {config.name}: {row.requests} requests, "
                              f"{row.seconds:.1f} s" + (f" ({row.skipped})" if row.skipped
                                                        else ""))
    title = (f"Quality on {n} scenes of {size[0]}x{size[1]} ({args.dialect}, model sees "
             f">= {args.min_size} px, {args.duplicates} duplicate(s) per box; "
             f"{platform.machine()})")
    console.print(table(rows, title))
    for r in rows:
        for why in ([r.skipped] if r.skipped else []) + r.problems:
            console.print(f"[yellow]{r.name}: {why}[/yellow]")
        if r.errors:
            console.print(f"[yellow]{r.name}: {r.errors} images failed[/yellow]")
        if r.truncated or r.repetition:
            console.print(f"{r.name}: {r.truncated} truncated, {r.repetition} repetition")
    for line in gains(rows):
        console.print(line)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"f1": r.f1} for r in rows], indent=2)
                             + "\n", encoding="utf-8")
    return 0 if all(not r.skipped and not r.problems for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
