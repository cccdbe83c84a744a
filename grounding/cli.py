"""The ``grounding`` command line. Each command's help is its documentation."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from grounding import __version__
from grounding.classes import ClassMap
from grounding.dialects import DIALECTS, get_dialect
from grounding.errors import GroundingError
from grounding.geometry import model_frame

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
    from grounding.assemble import result_from_text

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


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="Image files to look at.")],
    classes: Annotated[str | None, typer.Option(
        help='Comma-separated classes to find, e.g. "person,car".')] = None,
    ontology: Annotated[Path | None, typer.Option(
        help='JSON file mapping prompt phrases to class names: {"pedestrian": "person"}.')
    ] = None,
    prompt: Annotated[str | None, typer.Option(
        help="A referring expression to locate (\"the red car on the left\"), or with "
             "--classes/--ontology a full prompt replacing the built-in one.")] = None,
    points: Annotated[bool, typer.Option("--points", help="Ask for points, not boxes.")] = False,
    model: Annotated[str, typer.Option(
        help="Hub id or local checkpoint directory.")] = "Qwen/Qwen2.5-VL-7B-Instruct",
    dialect: Annotated[str | None, typer.Option(
        help="Override the dialect read from the checkpoint's config.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per generate() call.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="Generation limit; an answer that hits it is flagged truncated.")] = 2048,
    min_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget: smallest model frame (default: the processor's).")] = None,
    max_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget: largest model frame (default: the processor's). Grounding "
             "quality depends on it; see the README.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: auto).")
    ] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write DIR/<stem>.json and an overlay DIR/<stem>.jpg per image instead of "
             "JSON lines on stdout.")] = None,
) -> None:
    """Find classes, a referring expression, or points in images with a local Qwen-VL.

    Prints one JSON record per image (one per line) or, with --out, writes a record and
    an overlay per image. A bad image gets a record with "error" set; the others still
    run, and the exit status is 1 if any image failed.
    """
    from rich.console import Console
    from rich.progress import Progress

    from grounding.backends.local import LocalBackend, ModelLoadError
    from grounding.detector import Detector, load_ontology

    if sum(x is not None for x in (classes, ontology)) > 1:
        raise typer.BadParameter("give --classes or --ontology, not both")
    if classes is None and ontology is None and prompt is None:
        raise typer.BadParameter("give --classes, --ontology or --prompt")
    try:
        wanted = load_ontology(ontology) if ontology is not None else classes
        backend = LocalBackend(model, dialect=dialect, device=device, min_pixels=min_pixels,
                               max_pixels=max_pixels, max_new_tokens=max_new_tokens)
    except (ModelLoadError, GroundingError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    detector = Detector(backend, batch_size=batch_size)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    stems: dict[str, int] = {}
    with Progress(transient=True, disable=len(images) < 2,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("detecting", total=len(images))
        results = detector.detect_many([str(p) for p in images], wanted, prompt,
                                       points=points, system=system)
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
