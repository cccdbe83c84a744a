"""Parser benchmark: grounding vs supervision on real Qwen-VL outputs.

What it measures
----------------
The corpus is the verbatim model answers in ``tests/fixtures/real_outputs/*.txt``, each
read in its family's dialect by file prefix (``qwenvl_`` Qwen-VL, ``qwen2vl_`` Qwen2-VL,
``qwen25vl_`` Qwen2.5-VL, ``qwen3vl_`` Qwen3-VL, ``deepseekvl2_`` DeepSeek-VL2), reported
as two corpora: ``issue 14`` (the 15 Qwen2.5-VL/Qwen3-VL cookbook answers) and ``issue 15``
(the 33 answers of every family to other prompts). Each answer is turned into detections by

* grounding:   ``grounding.result_from_text(text, dialect, image_size=..., input_size=...)``
  (parse + rescale + clip + class/score checks + duplicate removal, which is on by
  default: the whole text -> Result path in image pixels),
* grounding without dedup: the same with ``dedup_iou=None``, for what dedup costs, and
* supervision: ``sv.Detections.from_vlm(sv.VLM.QWEN_2_5_VL / QWEN_3_VL / DEEPSEEK_VL_2,
  text, ...)`` (parse + rescale). supervision 0.31 has no Qwen-VL or Qwen2-VL parser:
  those answers count 0 for it (``no sv.VLM``).

1. Recovery: per file, how many objects each tool returns (grounding: boxes + points;
   supervision: boxes). An exception is caught per file and shown as ``error: <Type>``.
   Counts are not checked against a ground truth; read them together with the file notes
   in ``tests/fixtures/real_outputs/README.md``.
2. Throughput: each tool turns the texts into detections over and over
   (``time.perf_counter``, GC off). The tools take turns, one timing round each, for
   ``--rounds`` rounds, so that a busy machine slows them alike; the table shows each
   tool's median round, and ``grounding/sv`` is the median over rounds of supervision's
   time divided by grounding's in the same round (>1: grounding is faster). The subset
   that matters is the texts supervision accepts (no exception, at least one object), so
   both tools read the same texts; the whole corpus is shown for context.
3. ``--profile``: where grounding's time goes on the sv-accepted texts, stage by stage
   (parse, build_result without dedup, dedup), each timed on its own, and the top
   functions of a cProfile run of the full path.

Both tools get one fixed frame (``--frame``, default 4096x4096) as the image size, and for
Qwen2.5-VL also as the model input size, so coordinates are not really rescaled: only object
counts and time matter here. Qwen2.5-VL writes absolute pixels of its resized input (up to
~1900 in this corpus), so a frame smaller than the largest coordinate makes grounding clip
boxes that lie off that frame and drop the ones left with no area (the ``dropped`` column),
while supervision keeps them.

Where the time went (issue 14)
------------------------------
Measured with this script on the project's 2-core machine (Xeon 2.5 GHz, CPython 3.11.7,
supervision 0.31.2), sv-accepted texts (8 answers, 67 objects). It is a shared machine:
absolute µs move by +-30% from run to run, the interleaved ratios by about +-0.05.

Before (the tree when dedup was switched on, rebuilt in a worktree and run with this
script): grounding/sv 0.15x with dedup, 0.23x without. ``--profile``: parse 72 µs/text
(19%), build_result 183 (47%), dedup 101 (26%) of 387 µs/text; supervision 60.
(The README's earlier 0.75x is from an older tree; that tree measures 0.47x here today,
and the tree just before dedup 0.24x.) cProfile of the full path, 200 passes (shares
of its total, callees included):

* ``Result.filter`` 42%: build_result filtered three times (low_score, no_area,
  outside) and each filter copied every box with ``dataclasses.replace`` (45,000 calls,
  36%), which runs the Box validation again; nothing was ever removed.
* Box validation, ``_coords`` 12%: 53,600 calls (4 per box: made + 3 copies), each
  rebuilding the tuple through a generator and testing ``isfinite`` per number.
* dedup 19%: every answer with 2+ boxes went through a Python ranking sort and
  supervision's ``box_non_max_suppression`` (10%: an IoU matrix, then one numpy pass per
  box).
* parsing 25%: ``object_from_dict`` (``numbers`` down an isinstance chain, ``label_of``, a
  dict comprehension, a frozen dataclass ``__init__``), a generator per list item, and
  the XML-point and HTML-box parsers (regex scans, sorted merges) on answers without a
  single ``<``. Geometry: 12 calls to min/max per box.

After: grounding/sv 1.08-1.19x with dedup (median of 8 runs 1.1x), 1.19-1.31x without
(1.27x). ``--profile``: parse 26 µs/text (44%), build_result 21 (35%), dedup 4 (6%) of
59 µs/text; supervision 68. What changed:

* build_result drops and counts on its lists before the Result exists (no copy); the
  no_area pass runs only when a box has no area, the outside pass only with points;
  rescale + clip is one function without min/max calls.
* dedup runs a cheap test first (``may_have_duplicates``: boxes grouped by class, sorted
  by x, a sweep that stops where an IoU above the threshold is impossible); only a
  possible duplicate goes on to the ranking and supervision's NMS. Same results as the
  exact path (fuzzed, near-threshold pairs included).
* Box/Point check four (two) finite floats in order in place; anything else takes the
  old path with the same errors.
* parsing: the usual ``{"bbox_2d": [4 ints], "label": str}`` takes a short path
  (no calls into ``numbers``/``label_of``, no dict copy without other keys), RawObject is
  made without five ``object.__setattr__`` calls, ``json`` decodes in place, and the tag
  parsers are skipped when the text has no ``<``.

What is left is per object: grounding spends ~5 µs per object (JSON ~0.5, dict to RawObject
~1.3, Box + rescale/clip + checks ~1.5, dedup ~0.5, the rest interpreter overhead)
against supervision's ~1.3, and ~10 µs per answer against supervision's ~35. So it wins
on short answers and loses on long ones: ~3x faster on the four one-object answers,
~0.7-0.85x on the 12-object ones and ~0.5x on the 27-object dining table. On all 15
answers (``all``) it is ~0.65x per answer, but those include the HTML, OCR and
malformed answers supervision reads nothing from, which take grounding's slower paths
(HTML parser, brace matching, Python-literal fallback); per object recovered it is
faster there too.

How to run (from the repository root)::

    python bench/parse.py                 # ~0.3 s per tool and round, 7 rounds
    python bench/parse.py --seconds 0.1   # quicker
    python bench/parse.py --repeat 500    # a fixed number of passes over the texts per round
    python bench/parse.py --profile       # also: grounding's time by stage and function
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import os
import platform
import statistics
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
from grounding.core.assemble import build_result
from grounding.core.dedup import dedup
from grounding.core.dialects import get_dialect

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real_outputs"

Size = tuple[int, int]


@dataclass
class Sample:
    name: str
    dialect: str  # grounding dialect name
    text: str

    @property
    def corpus(self) -> str:
        """``issue 14``: the Qwen2.5-VL/Qwen3-VL cookbook answers the parser was built on;
        ``issue 15``: the answers collected since, from every family, to other prompts."""
        return "issue 14" if self.name in ISSUE14 else "issue 15"


FAMILY_DIALECT = {"qwenvl_": "qwen-vl", "qwen2vl_": "qwen2-vl", "qwen25vl_": "qwen2.5-vl",
                  "qwen3vl_": "qwen3-vl", "deepseekvl2_": "deepseek-vl2"}

ISSUE14 = frozenset((
    "qwen25vl_docparsing_qwenvl_html.txt", "qwen25vl_ocr_text_spotting_receipt.txt",
    "qwen25vl_spatial_brave_person.txt", "qwen25vl_spatial_cakes_describe.txt",
    "qwen25vl_spatial_counting_json_plus_prose.txt",
    "qwen25vl_spatial_paper_fox_shadow_abs_gt1000.txt", "qwen25vl_spatial_plaintext_format.txt",
    "qwen25vl_spatial_small_cakes.txt", "qwen25vl_spatial_sunglasses.txt",
    "qwen25vl_spatial_top_right_brown_cake.txt", "qwen3vl_2d_grounding_dining_table.txt",
    "qwen3vl_omni_anime_nested_names_MALFORMED.txt", "qwen3vl_omni_food_name_zh_en.txt",
    "qwen3vl_spatial_point_free_space.txt", "qwen3vl_think_with_images_zoom_tool_call.txt",
))

# supervision 0.31's sv.VLM has QWEN_2_5_VL, QWEN_3_VL and DEEPSEEK_VL_2; no Qwen-VL or
# Qwen2-VL: those answers count 0 for it.
SV_VLM = {"qwen2.5-vl": "QWEN_2_5_VL", "qwen3-vl": "QWEN_3_VL", "deepseek-vl2": "DEEPSEEK_VL_2"}


@dataclass
class Outcome:
    count: int | None  # None when the tool raised
    error: str | None = None
    dropped: int = 0

    @property
    def cell(self) -> str:
        if self.error == "no sv.VLM":
            return "0 (no sv.VLM)"
        return str(self.count) if self.error is None else f"error: {self.error}"


def extract_raw(path: Path) -> str:
    """The model text between the RAW MODEL OUTPUT markers of a corpus file."""
    text = path.read_text(encoding="utf-8")
    return text.split("-----\n", 1)[1].rsplit("\n-----", 1)[0]


def load_corpus(corpus: Path) -> list[Sample]:
    samples = []
    for path in sorted(corpus.glob("*.txt")):
        dialect = next((d for prefix, d in FAMILY_DIALECT.items()
                        if path.name.startswith(prefix)), None)
        if dialect is None:
            continue
        samples.append(Sample(path.name, dialect, extract_raw(path)))
    return samples


def input_size_of(sample: Sample, frame: Size) -> Size | None:
    """Qwen2.5-VL writes pixels of its input frame: the frame; Qwen3-VL writes 0-1000."""
    return frame if sample.dialect == "qwen2.5-vl" else None


def grounding_fn(sample: Sample, frame: Size) -> Callable[[], object]:
    """The full path, defaults as a user gets them (duplicates removed)."""
    input_size = input_size_of(sample, frame)
    text, dialect = sample.text, sample.dialect
    return lambda: result_from_text(text, dialect, image_size=frame, input_size=input_size)


def grounding_no_dedup_fn(sample: Sample, frame: Size) -> Callable[[], object]:
    input_size = input_size_of(sample, frame)
    text, dialect = sample.text, sample.dialect
    return lambda: result_from_text(text, dialect, image_size=frame, input_size=input_size,
                                    dedup_iou=None)


def supervision_fn(sample: Sample, frame: Size) -> Callable[[], object]:
    text = sample.text
    if sample.dialect == "qwen2.5-vl":
        return lambda: sv.Detections.from_vlm(
            sv.VLM.QWEN_2_5_VL, text, input_wh=frame, resolution_wh=frame
        )
    vlm = getattr(sv.VLM, SV_VLM[sample.dialect])
    return lambda: sv.Detections.from_vlm(vlm, text, resolution_wh=frame)


def run_grounding(sample: Sample, frame: Size) -> Outcome:
    try:
        result = grounding_fn(sample, frame)()
    except Exception as exc:
        return Outcome(None, type(exc).__name__)
    return Outcome(len(result.boxes) + len(result.points),
                   dropped=sum(result.dropped.values()))


def run_supervision(sample: Sample, frame: Size) -> Outcome:
    if sample.dialect not in SV_VLM:
        return Outcome(0, "no sv.VLM")
    try:
        detections = supervision_fn(sample, frame)()
    except Exception as exc:
        return Outcome(None, type(exc).__name__)
    return Outcome(len(detections))


def one_round(calls: list[Callable[[], object]], passes: int) -> float:
    """Seconds for ``passes`` passes over ``calls``, GC off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(passes):
            for call in calls:
                call()
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def calibrate(calls: list[Callable[[], object]], seconds: float) -> int:
    """Passes over ``calls`` that last about ``seconds``."""
    one_round(calls, 1)  # warm-up (imports, regex caches)
    n, elapsed = 1, one_round(calls, 1)
    while elapsed < seconds / 10:  # grow until the estimate is not timer noise
        n *= 10
        elapsed = one_round(calls, n)
    return max(1, math.ceil(n * seconds / elapsed))


def time_tools(tools: dict[str, list[Callable[[], object]]], repeat: int | None,
               seconds: float, rounds: int) -> dict[str, tuple[list[float], int]]:
    """Per tool: seconds per pass over its calls in each round, and the passes per round.

    The tools take turns round by round, so a load that comes and goes on the machine
    falls on all of them; compare them round by round."""
    passes = {name: repeat if repeat is not None else calibrate(calls, seconds)
              for name, calls in tools.items()}
    times: dict[str, list[float]] = {name: [] for name in tools}
    for _ in range(rounds):
        for name, calls in tools.items():
            times[name].append(one_round(calls, passes[name]) / passes[name])
    return {name: (times[name], passes[name]) for name in tools}


def stage_profile(samples: list[Sample], frame: Size, seconds: float, rounds: int,
                  console: Console) -> None:
    """Where grounding's time goes on ``samples``: each stage of the full path timed on
    its own (medians of interleaved rounds), then cProfile's top functions."""
    import cProfile
    import pstats

    dialects = [get_dialect(smp.dialect) for smp in samples]
    sizes = [input_size_of(smp, frame) for smp in samples]
    parsed = [d.parse(smp.text) for d, smp in zip(dialects, samples, strict=True)]
    built = [build_result(p, d, image_size=frame, input_size=size, dedup_iou=None)
             for p, d, size in zip(parsed, dialects, sizes, strict=True)]
    stages = {
        "parse (dialect.parse: JSON, tags, fields -> RawObject)":
            [lambda d=d, t=smp.text: d.parse(t) for d, smp in zip(dialects, samples,
                                                                   strict=True)],
        "build_result without dedup (rescale, clip, checks, Box, Result)":
            [lambda p=p, d=d, size=size: build_result(p, d, image_size=frame,
                                                      input_size=size, dedup_iou=None)
             for p, d, size in zip(parsed, dialects, sizes, strict=True)],
        "dedup (grounding.core.dedup.dedup)": [lambda r=r: dedup(r) for r in built],
        "full path (result_from_text)": [grounding_fn(smp, frame) for smp in samples],
        "supervision from_vlm": [supervision_fn(smp, frame) for smp in samples],
    }
    timed = time_tools(stages, None, seconds, rounds)
    table = Table(title=f"grounding by stage on the {len(samples)} sv-accepted texts "
                        f"(median of {rounds} interleaved rounds)")
    table.add_column("stage")
    table.add_column("µs/text", justify="right")
    table.add_column("share of full", justify="right")
    full = statistics.median(timed["full path (result_from_text)"][0])
    for name, (per_pass, _) in timed.items():
        us = statistics.median(per_pass) / len(samples) * 1e6
        share = "" if name.startswith("supervision") else f"{us / (full / len(samples) * 1e6):.0%}"
        table.add_row(name, f"{us:,.1f}", share)
    console.print(table)

    calls = stages["full path (result_from_text)"]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        for call in calls:
            call()
    profiler.disable()
    console.print("cProfile of the full path, 200 passes (its own overhead inflates "
                  "small functions), top 15 by own time:")
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
    console.print(stream.getvalue().split("\n\n", 1)[-1].rstrip(), markup=False,
                  highlight=False)


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
    group.add_argument("--seconds", type=float, default=0.3,
                       help="target duration of one timing round per tool (default: 0.3)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timing rounds per tool, taken in turns; medians are shown "
                             "(default: 7)")
    parser.add_argument("--profile", action="store_true",
                        help="also time grounding's stages and print its top functions")
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
        parser.error(f"no qwenvl_/qwen2vl_/qwen25vl_/qwen3vl_/deepseekvl2_ .txt files in "
                     f"{args.corpus}")

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
    table.add_column("corpus")
    table.add_column("dialect")
    table.add_column("grounding", justify="right")
    table.add_column("dropped", justify="right")
    table.add_column("supervision", justify="right")

    outcomes: list[tuple[Sample, Outcome, Outcome]] = []
    for sample in samples:
        g, s = run_grounding(sample, frame), run_supervision(sample, frame)
        outcomes.append((sample, g, s))
        table.add_row(sample.name, sample.corpus, sample.dialect, g.cell,
                      str(g.dropped) if g.dropped else "", s.cell)

    def total(results: list[Outcome]) -> str:
        n = sum(o.count for o in results if o.count is not None)
        errors = sum(o.error is not None and o.error != "no sv.VLM" for o in results)
        unread = sum(o.error == "no sv.VLM" for o in results)
        return f"{n}" + (f" ({errors} errors)" if errors else "") + (
            f" ({unread} unsupported)" if unread else "")

    def nonzero(results: list[Outcome]) -> int:
        return sum(bool(o.count) for o in results)

    table.add_section()
    for corpus in ("issue 14", "issue 15", None):
        part = [(g, s) for smp, g, s in outcomes if corpus in (None, smp.corpus)]
        g_all = [g for g, _ in part]
        s_all = [s for _, s in part]
        name = corpus or "both"
        table.add_row(f"TOTAL objects ({name})", "", "", total(g_all),
                      str(sum(o.dropped for o in g_all)), total(s_all), style="bold")
        table.add_row(f"texts with >= 1 object ({name})", "", "",
                      f"{nonzero(g_all)}/{len(part)}", "", f"{nonzero(s_all)}/{len(part)}",
                      style="bold")
    console.print(table)

    # ---- throughput -----------------------------------------------------------------
    accepted = [(smp, g, s) for smp, g, s in outcomes if s.error is None and s.count]
    subsets = [("sv-accepted", accepted)]
    subsets.append(("all", [(smp, g, s) for smp, g, s in outcomes
                            if g.error is None and s.error is None]))

    mode = (f"{args.repeat} passes per round" if args.repeat is not None
            else f"~{args.seconds:g} s per round")
    speed = Table(title=f"Throughput (median of {args.rounds} interleaved rounds, {mode}, "
                        "GC off)")
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
        g_objects = sum(g.count for _, g, _ in subset)
        tools = {
            "grounding": (grounding_fn, g_objects),
            "grounding, no dedup": (grounding_no_dedup_fn, g_objects),
            "supervision": (supervision_fn, sum(s.count for _, _, s in subset)),
        }
        timed = time_tools({tool: [make(smp, frame) for smp, _, _ in subset]
                            for tool, (make, _) in tools.items()},
                           args.repeat, args.seconds, args.rounds)
        sv_times = timed["supervision"][0]
        for i, (tool, (_, objects)) in enumerate(tools.items()):
            per_pass, passes = timed[tool]
            median = statistics.median(per_pass)
            ratio = "" if tool == "supervision" else "{:.2f}x".format(statistics.median(
                sv / own for sv, own in zip(sv_times, per_pass, strict=True)))
            speed.add_row(label if i == 0 else "", str(n_texts) if i == 0 else "", tool,
                          str(objects), f"{n_texts / median:,.0f}", f"{objects / median:,.0f}",
                          f"{median / n_texts * 1e6:,.1f}", f"{passes:,}", ratio)
        speed.add_section()
    console.print(speed)
    console.print("objects = objects recovered per pass over the subset; passes = passes over "
                  "the subset per timing round.")
    console.print("grounding/sv = median over rounds of supervision's time ÷ grounding's time "
                  "in the same round, on the same texts (>1: grounding is faster).")
    console.print("sv-accepted = texts on which supervision raises nothing and recovers at least "
                  "one object: " + ", ".join(smp.name for smp, _, _ in accepted) + ".")
    console.print("all = every text neither tool raised on, of the families supervision "
                  "reads (each tool's own objects/s; for context only, the tools do different "
                  "work on the texts supervision rejects).")
    if args.profile and accepted:
        stage_profile([smp for smp, _, _ in accepted], frame, args.seconds, args.rounds,
                      console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
