"""Parser benchmark: grounding vs supervision on real Qwen-VL outputs.

What it measures
----------------
The corpus is the verbatim model answers in ``tests/fixtures/real_outputs/*.txt``
(``qwen25vl_*`` files are Qwen2.5-VL, ``qwen3vl_*`` files are Qwen3-VL). Each answer is
turned into detections by

* grounding:   ``grounding.result_from_text(text, dialect, image_size=..., input_size=...)``
  (parse + rescale + clip, the full text -> Result path), and
* supervision: ``sv.Detections.from_vlm(sv.VLM.QWEN_2_5_VL / QWEN_3_VL, text, ...)``
  (parse + rescale).

1. Recovery: per file, how many objects each tool returns (grounding: boxes + points;
   supervision: boxes). An exception is caught per file and shown as ``error: <Type>``.
   Counts are not checked against a ground truth; read them together with the file notes
   in ``tests/fixtures/real_outputs/README.md``.
2. Throughput: each tool parses the texts over and over (``time.perf_counter``, GC off,
   best of ``--rounds`` rounds) on the subset of texts supervision accepts (no exception,
   at least one object), so both tools see the same texts; texts/s, objects/s and the
   grounding/supervision speed ratio are printed. The same is printed for the whole corpus
   for context.

Both tools get one fixed frame (``--frame``, default 4096x4096) as the image size, and for
Qwen2.5-VL also as the model input size, so coordinates are not really rescaled: only object
counts and time matter here. Qwen2.5-VL writes absolute pixels of its resized input (up to
~1900 in this corpus), so a frame smaller than the largest coordinate makes grounding clip
boxes that lie off that frame and drop the ones left with no area (the ``dropped`` column),
while supervision keeps them.

How to run (from the repository root)::

    python bench/parse.py                 # ~1 s per tool and round, best of 3
    python bench/parse.py --seconds 0.2   # quicker
    python bench/parse.py --repeat 500    # a fixed number of passes over the texts per round
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import supervision as sv
from rich.console import Console
from rich.table import Table

import grounding
from grounding import result_from_text

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real_outputs"

Size = tuple[int, int]


@dataclass
class Sample:
    name: str
    dialect: str  # grounding dialect name
    text: str


@dataclass
class Outcome:
    count: int | None  # None when the tool raised
    error: str | None = None
    dropped: int = 0

    @property
    def cell(self) -> str:
        return str(self.count) if self.error is None else f"error: {self.error}"


def extract_raw(path: Path) -> str:
    """The model text between the RAW MODEL OUTPUT markers of a corpus file."""
    text = path.read_text(encoding="utf-8")
    return text.split("-----\n", 1)[1].rsplit("\n-----", 1)[0]


def load_corpus(corpus: Path) -> list[Sample]:
    samples = []
    for path in sorted(corpus.glob("*.txt")):
        if path.name.startswith("qwen25vl_"):
            dialect = "qwen2.5-vl"
        elif path.name.startswith("qwen3vl_"):
            dialect = "qwen3-vl"
        else:
            continue
        samples.append(Sample(path.name, dialect, extract_raw(path)))
    return samples


def grounding_fn(sample: Sample, frame: Size) -> Callable[[], object]:
    input_size = frame if sample.dialect == "qwen2.5-vl" else None
    text, dialect = sample.text, sample.dialect
    return lambda: result_from_text(text, dialect, image_size=frame, input_size=input_size)


def supervision_fn(sample: Sample, frame: Size) -> Callable[[], object]:
    text = sample.text
    if sample.dialect == "qwen2.5-vl":
        return lambda: sv.Detections.from_vlm(
            sv.VLM.QWEN_2_5_VL, text, input_wh=frame, resolution_wh=frame
        )
    return lambda: sv.Detections.from_vlm(sv.VLM.QWEN_3_VL, text, resolution_wh=frame)


def run_grounding(sample: Sample, frame: Size) -> Outcome:
    try:
        result = grounding_fn(sample, frame)()
    except Exception as exc:
        return Outcome(None, type(exc).__name__)
    return Outcome(len(result.boxes) + len(result.points),
                   dropped=sum(result.dropped.values()))


def run_supervision(sample: Sample, frame: Size) -> Outcome:
    try:
        detections = supervision_fn(sample, frame)()
    except Exception as exc:
        return Outcome(None, type(exc).__name__)
    return Outcome(len(detections))


def time_calls(calls: list[Callable[[], object]], repeat: int | None, seconds: float,
               rounds: int) -> tuple[float, int]:
    """Seconds per pass over ``calls`` (best round) and the passes per round used.

    Without ``repeat`` the passes per round are chosen so a round lasts about ``seconds``.
    """
    def one_round(n: int) -> float:
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            for _ in range(n):
                for call in calls:
                    call()
            return time.perf_counter() - start
        finally:
            if gc_was_enabled:
                gc.enable()

    if repeat is None:
        one_round(1)  # warm-up (imports, regex caches)
        n, elapsed = 1, one_round(1)
        while elapsed < seconds / 10:  # grow until the estimate is not timer noise
            n *= 10
            elapsed = one_round(n)
        repeat = max(1, math.ceil(n * seconds / elapsed))
    best = min(one_round(repeat) for _ in range(rounds))
    return best / repeat, repeat


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--repeat", type=int, default=None,
                       help="passes over the texts per timing round (default: calibrate "
                            "to --seconds)")
    group.add_argument("--seconds", type=float, default=1.0,
                       help="target duration of one timing round per tool (default: 1.0)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds per tool; the best is kept (default: 3)")
    parser.add_argument("--frame", type=int, nargs=2, default=(4096, 4096),
                        metavar=("W", "H"),
                        help="image size given to both tools, and model input size for "
                             "Qwen2.5-VL (default: 4096 4096)")
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help=f"folder of corpus .txt files (default: {CORPUS})")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")
    frame: Size = (args.frame[0], args.frame[1])

    samples = load_corpus(args.corpus)
    if not samples:
        parser.error(f"no qwen25vl_*/qwen3vl_* .txt files in {args.corpus}")

    console = Console(width=max(Console().width, 120))
    console.print(
        f"grounding {grounding.__version__} | supervision {metadata.version('supervision')} | "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    console.print(f"machine: {machine()}")
    console.print(f"corpus: {args.corpus} ({len(samples)} texts), frame {frame[0]}x{frame[1]}")

    # ---- recovery -------------------------------------------------------------------
    table = Table(title="Objects recovered per real model output")
    table.add_column("file")
    table.add_column("dialect")
    table.add_column("grounding", justify="right")
    table.add_column("dropped", justify="right")
    table.add_column("supervision", justify="right")

    outcomes: list[tuple[Sample, Outcome, Outcome]] = []
    for sample in samples:
        g, s = run_grounding(sample, frame), run_supervision(sample, frame)
        outcomes.append((sample, g, s))
        table.add_row(sample.name, sample.dialect, g.cell, str(g.dropped) if g.dropped else "",
                      s.cell)

    def total(results: list[Outcome]) -> str:
        n = sum(o.count for o in results if o.count is not None)
        errors = sum(o.error is not None for o in results)
        return f"{n}" + (f" ({errors} errors)" if errors else "")

    def nonzero(results: list[Outcome]) -> int:
        return sum(bool(o.count) for o in results)

    g_all = [g for _, g, _ in outcomes]
    s_all = [s for _, _, s in outcomes]
    table.add_section()
    table.add_row("TOTAL objects", "", total(g_all), str(sum(o.dropped for o in g_all)),
                  total(s_all), style="bold")
    table.add_row("texts with >= 1 object", "", f"{nonzero(g_all)}/{len(samples)}", "",
                  f"{nonzero(s_all)}/{len(samples)}", style="bold")
    console.print(table)

    # ---- throughput -----------------------------------------------------------------
    accepted = [(smp, g, s) for smp, g, s in outcomes if s.error is None and s.count]
    subsets = [("sv-accepted", accepted)]
    subsets.append(("all", [(smp, g, s) for smp, g, s in outcomes
                                  if g.error is None and s.error is None]))

    mode = (f"{args.repeat} passes per round" if args.repeat is not None
            else f"~{args.seconds:g} s per round")
    speed = Table(title=f"Throughput (best of {args.rounds} rounds, {mode}, GC off)")
    speed.add_column("subset")
    speed.add_column("texts", justify="right")
    speed.add_column("tool")
    speed.add_column("objects", justify="right")
    speed.add_column("texts/s", justify="right")
    speed.add_column("objects/s", justify="right")
    speed.add_column("µs/text", justify="right")
    speed.add_column("passes", justify="right")
    speed.add_column("grounding/sv", justify="right")

    for label, subset in subsets:
        if not subset:
            speed.add_row(label, "0", "-", "", "", "", "", "", "")
            continue
        n_texts = len(subset)
        rows = []
        for tool, make, objects in (
            ("grounding", grounding_fn, sum(g.count for _, g, _ in subset)),
            ("supervision", supervision_fn, sum(s.count for _, _, s in subset)),
        ):
            calls = [make(smp, frame) for smp, _, _ in subset]
            per_pass, passes = time_calls(calls, args.repeat, args.seconds, args.rounds)
            rows.append((tool, objects, n_texts / per_pass, objects / per_pass,
                         per_pass / n_texts * 1e6, passes))
        ratio = rows[0][2] / rows[1][2]
        for i, (tool, objects, tps, ops, us, passes) in enumerate(rows):
            speed.add_row(label if i == 0 else "", str(n_texts) if i == 0 else "", tool,
                          str(objects), f"{tps:,.0f}", f"{ops:,.0f}", f"{us:,.1f}",
                          f"{passes:,}", f"{ratio:.2f}x" if i == 0 else "")
        speed.add_section()
    console.print(speed)
    console.print("objects = objects recovered per pass over the subset; passes = passes over "
                  "the subset per timing round.")
    console.print("grounding/sv = grounding texts/s ÷ supervision texts/s on the same texts "
                  "(>1: grounding is faster).")
    console.print("sv-accepted = texts on which supervision raises nothing and recovers at least "
                  "one object: " + ", ".join(smp.name for smp, _, _ in accepted) + ".")
    console.print("all = every text neither tool raised on (each tool's own objects/s; for "
                  "context only, the tools do different work on the texts supervision rejects).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
