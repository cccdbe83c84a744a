"""The ``grounding`` command line. Each command's help is its documentation."""

from __future__ import annotations

import functools
import inspect
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from grounding._version import __version__
from grounding.backends.local import DEFAULT_MODEL
from grounding.core.classes import ClassMap
from grounding.core.dialects import DIALECTS, get_dialect
from grounding.core.errors import GroundingError
from grounding.core.geometry import model_frame

app = typer.Typer(
    name="grounding",
    help="Turn vision-language models into object detectors and auto-labelers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_SIZE = re.compile(r"^\s*(\d+)\s*[xX*,]\s*(\d+)\s*$")


def _size(text: str | None, option: str) -> tuple[int, int] | None:
    if text is None:
        return None
    m = _SIZE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise typer.BadParameter(f"expected WIDTHxHEIGHT, e.g. 1280x720; got {text!r}",
                                 param_hint=option)
    return int(m.group(1)), int(m.group(2))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"grounding {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Turn vision-language models into object detectors and auto-labelers."""


@app.command()
def parse(
    file: Annotated[str, typer.Argument(help="A file holding the model's answer, or - for stdin.")],
    dialect: Annotated[str, typer.Option(
        "--dialect", "-d", help=f"How the model writes locations: {', '.join(DIALECTS)}.")],
    input_size: Annotated[str | None, typer.Option(
        help="The model frame WxH (the image size the model saw). Needed by qwen2.5-vl to "
             "rescale; derived from --image-size and the pixel budget when omitted.")] = None,
    image_size: Annotated[str | None, typer.Option(
        help="The original image's displayed WxH: coordinates are rescaled into it.")] = None,
    classes: Annotated[str | None, typer.Option(
        help='Comma-separated class names, e.g. "person,car": labels get class ids.')] = None,
    min_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget used to derive --input-size (default: the dialect's processor).")
    ] = None,
    max_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget used to derive --input-size (default: the dialect's processor).")
    ] = None,
) -> None:
    """Read a model's answer and print the JSON record of every box and point in it.

    Without sizes the coordinates stay in the model's frame; with --image-size they are
    rescaled onto the original image and clipped to it. This is how to debug what a model
    actually said: `grounding parse answer.txt -d qwen2.5-vl --image-size 1024x1024`.
    """
    from grounding.core.assemble import result_from_text

    try:
        d = get_dialect(dialect)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dialect") from None
    frame = _size(input_size, "--input-size")
    image = _size(image_size, "--image-size")
    if file == "-":
        text = sys.stdin.read()
    else:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            typer.echo(f"error: cannot read {file}: {exc}", err=True)
            raise typer.Exit(2) from None
    try:
        if image is not None and frame is None:
            frame = model_frame(d, *image, min_pixels=min_pixels, max_pixels=max_pixels)
            if not d.is_relative:
                typer.echo(f"note: input size {frame[0]}x{frame[1]} derived from the image "
                           "size and the pixel budget; pass --input-size if it differs",
                           err=True)
        result = result_from_text(
            text, d, image_size=image, input_size=frame,
            classes=ClassMap.parse(classes) if classes else None,
            image=None if file == "-" else file,
        )
    except (GroundingError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(result.to_json())


# -- options shared by the commands that run a model ----------------------------------

Classes = Annotated[str | None, typer.Option(
    help='Comma-separated classes to find, e.g. "person,car".')]
Ontology = Annotated[Path | None, typer.Option(
    help='JSON file mapping prompt phrases to class names: {"pedestrian": "person"}.')]
Points = Annotated[bool, typer.Option("--points", help="Ask for points, not boxes.")]
BackendKind = Annotated[str, typer.Option(
    "--backend", help="local: transformers in this process; openai: an OpenAI-compatible "
                      "server (vLLM, SGLang, hosted APIs).")]
Model = Annotated[str | None, typer.Option(
    help=f"local: hub id or checkpoint directory (default {DEFAULT_MODEL}); "
         "openai: the served model name (default: the first the server lists).")]
DialectOpt = Annotated[str | None, typer.Option(
    "--dialect", help="How the model writes boxes (default: from the checkpoint's config, "
                      "or guessed from the served model name).")]
BatchSize = Annotated[int | None, typer.Option(
    min=1, help="Images handed to the backend at once (local default 4; openai default "
                "4 x concurrency).")]
MaxNewTokens = Annotated[int, typer.Option(
    min=1, help="Generation limit; an answer that hits it is flagged truncated.")]
MinPixels = Annotated[int | None, typer.Option(
    help="Pixel budget: smallest model frame (default: the dialect's, see README).")]
MaxPixels = Annotated[int | None, typer.Option(
    help="Pixel budget: largest model frame (default: the dialect's, see README).")]
System = Annotated[str | None, typer.Option(help="System prompt.")]
Device = Annotated[str | None, typer.Option(
    help="local: cuda, cuda:N, cpu, or auto to spread a model over all GPUs (default: the "
         "first GPU, else the CPU).")]
BaseUrl = Annotated[str | None, typer.Option(
    help="openai: server URL including /v1, e.g. http://gpu-box:8000/v1.")]
ApiKeyEnv = Annotated[str | None, typer.Option(
    help="openai: name of the environment variable holding the API key.")]
ApiKeyHeader = Annotated[str, typer.Option(
    help="openai: header carrying the key; Authorization sends 'Bearer KEY', any other "
         "header (e.g. x-api-key) the bare key.")]
Header = Annotated[list[str] | None, typer.Option(
    help="openai: extra header 'Name: value' (repeatable).")]
Endpoint = Annotated[str, typer.Option(
    help="openai: path under --base-url (or a full URL) taking chat requests.")]
Concurrency = Annotated[int, typer.Option(min=1, help="openai: requests in flight.")]
Timeout = Annotated[float, typer.Option(help="openai: seconds per request.")]
MaxRetries = Annotated[int, typer.Option(
    min=0, help="openai: retries on 429, 5xx, connection errors and timeouts.")]
TokenParam = Annotated[str, typer.Option(help="openai: max_tokens or max_completion_tokens.")]
Logprobs = Annotated[bool, typer.Option(help="openai: ask for token log-probabilities.")]
TextFirst = Annotated[bool, typer.Option(
    help="openai: put the text before the images in the message (as Qianfan's examples "
         "do); the default is images first, as Qwen's.")]
References = Annotated[list[Path] | None, typer.Option(
    "--reference", help="An example image shown before every image in the same message "
                        "(repeatable): find more like it. Coordinates still refer to each "
                        "image.")]
ImageFormat = Annotated[str, typer.Option(
    help="openai: how the model frame is sent: jpeg (quality 95: a fraction of PNG's encode "
         "time and bytes) or png (lossless).")]
MinScore = Annotated[float | None, typer.Option(
    help="Drop boxes and points scored below this (token log-probability rule, see README; "
         "unscored ones are kept).")]
JsonSchema = Annotated[bool, typer.Option(
    help="openai: ask the server for JSON-schema-constrained output (vLLM).")]
Verify = Annotated[bool, typer.Option(
    "--verify", help='Ask the model about every box "Is this a LABEL? Answer yes or no." '
                     "(a crop with context, one token) and drop the boxes it doubts; the "
                     "score is kept as attributes.verify_score (see README).")]
VerifyThreshold = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="--verify: drop boxes with P(yes) / (P(yes) + P(no)) below this.")]


def make_backend(kind: str, *, model: str | None, dialect: str | None, device: str | None,
                 min_pixels: int | None, max_pixels: int | None, max_new_tokens: int,
                 base_url: str | None, api_key_env: str | None, api_key_header: str,
                 header: list[str] | None, endpoint: str, concurrency: int, timeout: float,
                 max_retries: int, token_param: str, logprobs: bool, json_schema: bool,
                 image_format: str = "jpeg", text_first: bool = False):
    """The backend the command-line options describe."""
    if kind == "local":
        from grounding.backends.local import DEFAULT_MODEL, LocalBackend

        return LocalBackend(model or DEFAULT_MODEL, dialect=dialect, device=device,
                            min_pixels=min_pixels, max_pixels=max_pixels,
                            max_new_tokens=max_new_tokens)
    if kind != "openai":
        raise typer.BadParameter("expected local or openai", param_hint="--backend")
    if not base_url:
        raise typer.BadParameter("--backend openai needs --base-url", param_hint="--base-url")
    headers = {}
    for item in header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise typer.BadParameter(f"expected 'Name: value', got {item!r}", param_hint="--header")
        headers[name.strip()] = value.strip()
    from grounding.backends.remote.client import OpenAIBackend

    return OpenAIBackend(model, base_url=base_url, dialect=dialect, api_key_env=api_key_env,
                         api_key_header=api_key_header, headers=headers, endpoint=endpoint,
                         timeout=timeout, concurrency=concurrency, max_retries=max_retries,
                         min_pixels=min_pixels, max_pixels=max_pixels,
                         max_new_tokens=max_new_tokens, token_param=token_param,
                         logprobs=logprobs, json_schema=json_schema, image_format=image_format,
                         text_first=text_first)


# Options every command that runs a model takes, defined once: (name, type, default).
_BACKEND_OPTIONS = (
    ("backend", BackendKind, "local"),
    ("model", Model, None),
    ("dialect", DialectOpt, None),
    ("min_pixels", MinPixels, None),
    ("max_pixels", MaxPixels, None),
    ("device", Device, None),
    ("base_url", BaseUrl, None),
    ("api_key_env", ApiKeyEnv, None),
    ("api_key_header", ApiKeyHeader, "Authorization"),
    ("header", Header, None),
    ("endpoint", Endpoint, "/chat/completions"),
    ("concurrency", Concurrency, 8),
    ("timeout", Timeout, 120.0),
    ("max_retries", MaxRetries, 5),
    ("token_param", TokenParam, "max_tokens"),
    ("logprobs", Logprobs, True),
    ("image_format", ImageFormat, "jpeg"),
    ("text_first", TextFirst, False),
)


def with_backend_options(command):
    """Give a command the backend options of _BACKEND_OPTIONS after its own; they reach it
    as one dict, ``backend_options``, so detect, label and ask share one definition."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "backend_options"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                annotation=annotation)
              for name, annotation, default in _BACKEND_OPTIONS]

    @functools.wraps(command)
    def run(**kwargs):
        options = {name: kwargs.pop(name) for name, _, _ in _BACKEND_OPTIONS}
        return command(backend_options=options, **kwargs)

    run.__signature__ = signature.replace(parameters=own + shared)
    run.__annotations__ = {p.name: p.annotation for p in own + shared}
    return run


def _setup(options: dict, classes: str | None, ontology: Path | None, prompt: str | None,
           *, max_new_tokens: int, json_schema: bool, need_classes: bool = False):
    """(backend, classes-or-ontology, ontology dict) from a command's options; exits 2 with
    one line on a bad option, a missing model or an unreachable server."""
    from grounding.pipeline.detector import load_ontology

    if classes is not None and ontology is not None:
        raise typer.BadParameter("give --classes or --ontology, not both")
    if need_classes and classes is None and ontology is None:
        raise typer.BadParameter("give --classes or --ontology")
    if classes is None and ontology is None and prompt is None:
        raise typer.BadParameter("give --classes, --ontology or --prompt")
    try:
        mapping = load_ontology(ontology) if ontology is not None else None
    except GroundingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    engine = _engine(options, max_new_tokens=max_new_tokens, json_schema=json_schema)
    return engine, mapping if mapping is not None else classes, mapping


def _engine(options: dict, *, max_new_tokens: int, json_schema: bool):
    """The backend a command's options describe; exits 2 with one line when it cannot be
    had (a missing model, an unreachable server, a bad option value)."""
    settings = {k: v for k, v in options.items() if k != "backend"}
    try:
        return make_backend(options["backend"], max_new_tokens=max_new_tokens,
                            json_schema=json_schema, **settings)
    except (GroundingError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _query(wanted, prompt: str | None, *, points: bool, system: str | None,
           references: list[Path] | None):
    """The Query of a command's options; exits 2 with one line on a bad reference image."""
    from grounding.pipeline.detector import Query

    try:
        return Query.make(wanted, prompt, points=points, system=system,
                          references=[str(p) for p in references or []])
    except GroundingError as exc:
        typer.echo(f"error: reference image {exc}", err=True)
        raise typer.Exit(2) from None


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@app.command()
@with_backend_options
def detect(
    images: Annotated[list[Path], typer.Argument(help="Image files to look at.")],
    classes: Classes = None,
    ontology: Ontology = None,
    prompt: Annotated[str | None, typer.Option(
        help="A referring expression to locate (\"the red car on the left\"), or with "
             "--classes/--ontology a full prompt replacing the built-in one.")] = None,
    points: Points = False,
    reference: References = None,
    out: Annotated[Path | None, typer.Option(
        help="Write DIR/<stem>.json and an overlay DIR/<stem>.jpg per image instead of "
             "JSON lines on stdout.")] = None,
    batch_size: BatchSize = None,
    max_new_tokens: MaxNewTokens = 2048,
    system: System = None,
    json_schema: JsonSchema = False,
    min_score: MinScore = None,
    verify: Verify = False,
    verify_threshold: VerifyThreshold = 0.5,
    backend_options: dict | None = None,
) -> None:
    """Find classes, a referring expression, or points in images.

    The model runs locally (transformers) or on a server (--backend openai --base-url URL).

    Prints one JSON record per image (one per line) or, with --out, writes a record and
    an overlay per image. A bad image gets a record with "error" set; the others still
    run, and the exit status is 1 if any image failed.
    """
    from rich.progress import Progress

    from grounding.pipeline.detector import Detector

    engine, wanted, _ = _setup(backend_options, classes, ontology, prompt,
                               max_new_tokens=max_new_tokens, json_schema=json_schema)
    query = _query(wanted, prompt, points=points, system=system, references=reference)
    detector = Detector(engine, batch_size=batch_size, min_score=min_score, verify=verify,
                        verify_threshold=verify_threshold)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    stems: dict[str, int] = {}
    with Progress(transient=True, disable=len(images) < 2, console=_stderr_console()) as bar:
        task = bar.add_task("detecting", total=len(images))
        results = detector.detect_query([str(p) for p in images], query)
        for path, result in zip(images, results, strict=True):
            failed += result.error is not None
            if out is None:
                typer.echo(result.to_json())
            else:
                # Two inputs with one stem (a/x.jpg, b/x.png) must not overwrite each other.
                seen = stems.get(path.stem, 0)
                stems[path.stem] = seen + 1
                stem = path.stem if not seen else f"{path.stem}-{seen}"
                (out / f"{stem}.json").write_text(result.to_json(indent=1) + "\n",
                                                  encoding="utf-8")
                if result.error is None:
                    result.annotate().save(out / f"{stem}.jpg", quality=90)
            bar.advance(task)
    if failed:
        typer.echo(f"error: {failed} of {len(images)} images failed (see their records)",
                   err=True)
        raise typer.Exit(1)


@app.command()
@with_backend_options
def ask(
    image: Annotated[Path, typer.Argument(help="The image the detections were made on.")],
    question: Annotated[str, typer.Argument(
        help="The question, e.g. 'What colour is it? Answer in JSON as {\"color\": ...}'; "
             "{label} is replaced by each detection's label.")],
    detections: Annotated[Path, typer.Option(
        "--detections", help="A grounding record (grounding detect's output: one JSON "
                             "record, or JSON lines, where the record of IMAGE is used).")],
    about: Annotated[str, typer.Option(
        help="each: ask about every detection (a crop with context); all: ask once about "
             "the image with the boxes drawn and numbered 1..N.")] = "each",
    out: Annotated[Path | None, typer.Option(
        help="Write the updated record (answers in the detections' attributes, or in "
             '"answers" for --about all) to this JSON file.')] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Questions handed to the backend at once.")] = None,
    max_new_tokens: MaxNewTokens = 256,
    system: System = None,
    backend_options: dict | None = None,
) -> None:
    """Ask a question about each detection of a record, or about all of them.

    Each detection is asked about on a crop of it; with --about all, once on the image with
    the boxes numbered. The answers are printed.

    An answer holding a JSON object ({"color": "red"}) has its keys merged into the
    detection's attributes, any other answer is kept as attributes.answer. Example:
    grounding ask street.jpg 'What colour is this {label}? Answer as JSON {"color": ...}'
    --detections street.json --out street.qa.json
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from grounding.core.result import Result
    from grounding.io.images import load_image
    from grounding.io.records import pick_record, read_records
    from grounding.pipeline.qa import ask_with_answers, first_object

    if about not in ("each", "all"):
        raise typer.BadParameter("expected each or all", param_hint="--about")
    try:
        record = pick_record(read_records(detections), image, str(detections))
        result = Result.from_record(record)
        if result.error:
            raise GroundingError(f"the record of {image} is an error: {result.error}")
        picture = load_image(image)
        if result.image_size is not None and picture.size != result.image_size:
            raise GroundingError(
                f"{image} is {picture.width}x{picture.height} but the record is for "
                f"{result.width}x{result.height}: is it the image the detections were made on?")
    except GroundingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not question.strip():
        raise typer.BadParameter("the question is empty", param_hint="QUESTION")
    engine = _engine(backend_options, max_new_tokens=max_new_tokens, json_schema=False)
    answered, texts = ask_with_answers(result, picture, engine, question, about=about,
                                       batch_size=batch_size, system=system)
    failed = 0
    if about == "all":
        entry = answered.answers[-1]
        if entry.get("error"):
            failed = 1
            typer.echo(f"error: {entry['error']}", err=True)
        else:
            typer.echo(entry["answer"])
    else:
        table = Table(title=Text(f"{question} ({len(answered.boxes)} detections)"))
        for column in ("#", "label", "answer"):
            table.add_column(column, overflow="fold")
        for i, (box, text) in enumerate(zip(answered.boxes, texts, strict=True), 1):
            if text is None:
                failed += 1
                text = f"failed: {box.attributes['ask_error']}"
            elif found := first_object(text):
                text = json.dumps(found, ensure_ascii=False)
            table.add_row(str(i), Text(box.label or ""), Text(text))
        Console(width=max(100, shutil.get_terminal_size().columns)).print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(answered.to_json(indent=1) + "\n", encoding="utf-8")
    if failed:
        typer.echo(f"error: {failed} questions failed", err=True)
        raise typer.Exit(1)


FORMATS = ("coco", "yolo", "labelstudio")


def _formats(text: str | None) -> list[str]:
    if not text:
        return []
    names = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad:
        raise typer.BadParameter(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}",
                                 param_hint="--format")
    return names


@app.command()
@with_backend_options
def label(
    images_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (created or resumed).")],
    classes: Classes = None,
    ontology: Ontology = None,
    prompt: Annotated[str | None, typer.Option(
        help="A full prompt replacing the built-in one for the classes.")] = None,
    points: Points = False,
    reference: References = None,
    format: Annotated[str | None, typer.Option(
        "--format", help="Datasets to export at the end: coco,yolo,labelstudio.")] = None,
    val_fraction: Annotated[float, typer.Option(help="YOLO export: validation share.")] = 0.2,
    seed: Annotated[int, typer.Option(help="YOLO export: split seed.")] = 0,
    shard: Annotated[str | None, typer.Option(
        help="Label only shard I of N (I/N, e.g. 0/4): a deterministic share of the images, "
             "for N machines into N run directories that `grounding export` merges.")] = None,
    retry_errors: Annotated[bool, typer.Option(help="Try the images that failed again.")
    ] = False,
    force: Annotated[bool, typer.Option(
        help="Start over if the configuration changed (old files are kept, renamed).")] = False,
    batch_size: BatchSize = None,
    max_new_tokens: MaxNewTokens = 2048,
    system: System = None,
    json_schema: JsonSchema = False,
    min_score: MinScore = None,
    verify: Verify = False,
    verify_threshold: VerifyThreshold = 0.5,
    backend_options: dict | None = None,
) -> None:
    """Auto-label a folder of images into a run directory, resumably.

    Writes RUN_DIR/predictions.jsonl (one record per image, flushed as results arrive),
    RUN_DIR/errors.jsonl (images that failed, with the cause), RUN_DIR/run.json (the
    exact configuration) and RUN_DIR/summary.json. Run the same command again after a
    crash, Ctrl-C or kill -9: only what is missing is labelled.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from grounding.pipeline.detector import Detector
    from grounding.runs.labeling import label as run_label
    from grounding.runs.rundir import RunDir, parse_shard

    formats = _formats(format)
    try:
        shard_ix = parse_shard(shard)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard") from None
    if not images_dir.is_dir():
        raise typer.BadParameter(f"{images_dir} is not a directory", param_hint="IMAGES_DIR")
    engine, wanted, mapping = _setup(backend_options, classes, ontology, prompt,
                                     max_new_tokens=max_new_tokens, json_schema=json_schema,
                                     need_classes=True)
    detector = Detector(engine, batch_size=batch_size, min_score=min_score, verify=verify,
                        verify_threshold=verify_threshold)
    query = _query(wanted, prompt, points=points, system=system, references=reference)
    run = RunDir(out)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]:.1f} img/s"),
               TextColumn("{task.fields[objects]} objects"),
               TextColumn("{task.fields[errors]} errors"), TimeRemainingColumn())
    with Progress(*columns, console=_stderr_console()) as bar:
        task = bar.add_task("labelling", total=None, rate=0.0, objects=0, errors=0)

        def show(p) -> None:
            bar.update(task, total=p.total, completed=p.done, rate=p.rate,
                       objects=p.objects, errors=p.errors)

        try:
            summary = run_label(detector, query, images_dir, run, shard=shard_ix,
                                retry_errors=retry_errors, force=force, ontology=mapping,
                                on_progress=show)
        except KeyboardInterrupt:
            typer.echo(f"interrupted: everything finished is in {run.predictions}; run the "
                       "same command to go on", err=True)
            raise typer.Exit(130) from None
        except GroundingError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    for name in formats:
        _export([out], name, out / "export" / name, min_score=None, copy=False,
                val_fraction=val_fraction, seed=seed, overwrite=True)
    if summary["session"]["errors"]:
        typer.echo(f"note: {summary['session']['errors']} images failed; see "
                   f"{run.errors} (--retry-errors tries them again)", err=True)


def _export(run_dirs: list[Path], fmt: str, out: Path, *, min_score: float | None,
            copy: bool, val_fraction: float, seed: int, overwrite: bool) -> None:
    from grounding.formats import export_coco, export_labelstudio, export_yolo
    from grounding.runs.rundir import RunDir

    runs = [RunDir(p) for p in run_dirs]
    try:
        configs = [r.config() for r in runs]
    except GroundingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    classes = configs[0].get("classes") or []
    roots = {c.get("images_dir") for c in configs}
    if any((c.get("classes") or []) != classes for c in configs) or len(roots) != 1:
        typer.echo("error: the run directories differ in classes or images folder; export "
                   "them separately", err=True)
        raise typer.Exit(2)
    root = Path(roots.pop())

    def records():
        # Shards never overlap; the exporters skip (and list) a repeated image anyway.
        for run in runs:
            yield from run.records()

    try:
        if fmt == "coco":
            stats = export_coco(records(), root, classes, out, min_score=min_score, copy=copy,
                                overwrite=overwrite)
        elif fmt == "yolo":
            stats = export_yolo(records(), root, classes, out, val_fraction=val_fraction,
                                seed=seed, min_score=min_score, copy=copy, overwrite=overwrite)
        else:
            stats = export_labelstudio(records(), root, classes, out, min_score=min_score)
    except (FileExistsError, ValueError, OSError) as exc:
        typer.echo(f"error: {fmt} export to {out}: {exc}", err=True)
        raise typer.Exit(2) from None
    counts = {k: v for k, v in stats.to_dict().items() if v and k != "skipped"}
    typer.echo(f"{fmt}: {out} {json.dumps(counts)}", err=True)
    for line in stats.skipped[:20]:
        typer.echo(f"  skipped {line}", err=True)


@app.command()
def export(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (shards merge).")],
    format: Annotated[str, typer.Option("--format", help="coco, yolo or labelstudio.")],
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default RUN_DIR/export/FORMAT).")] = None,
    min_score: Annotated[float | None, typer.Option(
        help="Drop boxes scored below this (unscored boxes count as 1.0).")] = None,
    copy: Annotated[bool, typer.Option(
        help="Copy images instead of linking them (supervision's COCO reader needs copies).")
    ] = False,
    val_fraction: Annotated[float, typer.Option(help="YOLO: validation share.")] = 0.2,
    seed: Annotated[int, typer.Option(help="YOLO: split seed.")] = 0,
) -> None:
    """Build a COCO, YOLO or Label Studio dataset from one or more label runs."""
    names = _formats(format)
    if len(names) != 1:
        raise typer.BadParameter("give one format", param_hint="--format")
    # RUN_DIR/export/FORMAT belongs to grounding and is rebuilt; a folder of the user's
    # (--out) must be empty, so an export never mixes into an existing dataset.
    _export(run_dirs, names[0], out or run_dirs[0] / "export" / names[0], min_score=min_score,
            copy=copy, val_fraction=val_fraction, seed=seed, overwrite=out is None)


@app.command(name="eval")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A label run directory.")],
    gt: Annotated[Path, typer.Option(help="Ground truth: a COCO json or a YOLO folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """mAP@50, mAP@50:95, precision and recall per class of a run against ground truth.

    Label a sample with each candidate prompt, model or pixel budget, evaluate each run
    against a small hand-labelled set, and keep the best before labelling everything.
    """
    from grounding.formats.evaluate import evaluate
    from grounding.runs.rundir import RunDir

    run = RunDir(run_dir)
    try:
        config = run.config()
        report = evaluate(run.records(), config.get("classes") or [], gt,
                          images_root=Path(config["images_dir"]))
    except (GroundingError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console

        Console().print(report.table())


@app.command()
def doctor(
    model: Annotated[str | None, typer.Option(
        help=f"Hub id or checkpoint directory to check (default {DEFAULT_MODEL}).")] = None,
    device: Annotated[str | None, typer.Option(
        help="The --device to check: cuda, cuda:N, cpu or auto (default: the backend's "
             "choice).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")
    ] = False,
) -> None:
    """Check, before a long run, that the local backend can run here and how.

    Prints the versions that matter, every visible GPU (memory, compute capability, bf16),
    the device, dtype and attention kernel the backend would choose, and the model: where
    it is, its dialect and pixel budget. Nothing is downloaded and the model is not loaded.
    Exits 1 with the reason when the backend cannot run: torch, transformers or accelerate
    missing, an impossible --device, a missing model path, or a model not in the cache
    while HF_HUB_OFFLINE=1.
    """
    from grounding.backends.doctor import gather, render

    report = gather(model, device)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(render(report))
        if report.ok:
            typer.secho(report.verdict, fg="yellow" if report.warnings else "green", bold=True)
    if not report.ok:
        typer.secho(f"error: {report.verdict}", fg="red", err=True)
        raise typer.Exit(1)
