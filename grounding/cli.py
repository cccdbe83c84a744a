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


def make_backend(kind: str, *, model: str | None, dialect: str | None, device: str | None,
                 min_pixels: int | None, max_pixels: int | None, max_new_tokens: int,
                 base_url: str | None, api_key_env: str | None, api_key_header: str,
                 header: list[str] | None, endpoint: str, concurrency: int, timeout: float,
                 max_retries: int, token_param: str, logprobs: bool, json_schema: bool):
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
    from grounding.backends.remote import OpenAIBackend

    return OpenAIBackend(model, base_url=base_url, dialect=dialect, api_key_env=api_key_env,
                         api_key_header=api_key_header, headers=headers, endpoint=endpoint,
                         timeout=timeout, concurrency=concurrency, max_retries=max_retries,
                         min_pixels=min_pixels, max_pixels=max_pixels,
                         max_new_tokens=max_new_tokens, token_param=token_param,
                         logprobs=logprobs, json_schema=json_schema)


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
    backend: Annotated[str, typer.Option(
        help="local: transformers in this process; openai: an OpenAI-compatible server "
             "(vLLM, SGLang, hosted APIs).")] = "local",
    model: Annotated[str | None, typer.Option(
        help="local: hub id or checkpoint directory (default Qwen/Qwen2.5-VL-7B-Instruct); "
             "openai: the served model name (default: the first the server lists).")] = None,
    dialect: Annotated[str | None, typer.Option(
        help="How the model writes boxes (default: from the checkpoint's config, or guessed "
             "from the served model name).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="local: images per generate() call (default 4).")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="Generation limit; an answer that hits it is flagged truncated.")] = 2048,
    min_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget: smallest model frame (default: the dialect's, see README).")] = None,
    max_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget: largest model frame (default: the dialect's, see README).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    device: Annotated[str | None, typer.Option(
        help="local: cuda, cuda:1, cpu (default: auto).")] = None,
    base_url: Annotated[str | None, typer.Option(
        help="openai: server URL including /v1, e.g. http://gpu-box:8000/v1.")] = None,
    api_key_env: Annotated[str | None, typer.Option(
        help="openai: name of the environment variable holding the API key.")] = None,
    api_key_header: Annotated[str, typer.Option(
        help="openai: header carrying the key; Authorization sends 'Bearer KEY', any other "
             "header (e.g. x-api-key) the bare key.")] = "Authorization",
    header: Annotated[list[str] | None, typer.Option(
        help="openai: extra header 'Name: value' (repeatable).")] = None,
    endpoint: Annotated[str, typer.Option(
        help="openai: path under --base-url (or full URL) taking chat requests.")
    ] = "/chat/completions",
    concurrency: Annotated[int, typer.Option(min=1, help="openai: requests in flight.")] = 8,
    timeout: Annotated[float, typer.Option(help="openai: seconds per request.")] = 120.0,
    max_retries: Annotated[int, typer.Option(
        min=0, help="openai: retries on 429/5xx/connection errors.")] = 5,
    token_param: Annotated[str, typer.Option(
        help="openai: max_tokens or max_completion_tokens.")] = "max_tokens",
    logprobs: Annotated[bool, typer.Option(
        help="openai: ask for token log-probabilities.")] = True,
    json_schema: Annotated[bool, typer.Option(
        help="openai: ask the server for JSON-schema-constrained output (vLLM).")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Write DIR/<stem>.json and an overlay DIR/<stem>.jpg per image instead of "
             "JSON lines on stdout.")] = None,
) -> None:
    """Find classes, a referring expression, or points in images with a Qwen-VL model,
    local (transformers) or served (--backend openai --base-url URL).

    Prints one JSON record per image (one per line) or, with --out, writes a record and
    an overlay per image. A bad image gets a record with "error" set; the others still
    run, and the exit status is 1 if any image failed.
    """
    from rich.console import Console
    from rich.progress import Progress

    from grounding.detector import Detector, load_ontology

    if sum(x is not None for x in (classes, ontology)) > 1:
        raise typer.BadParameter("give --classes or --ontology, not both")
    if classes is None and ontology is None and prompt is None:
        raise typer.BadParameter("give --classes, --ontology or --prompt")
    try:
        wanted = load_ontology(ontology) if ontology is not None else classes
        engine = make_backend(
            backend, model=model, dialect=dialect, device=device, min_pixels=min_pixels,
            max_pixels=max_pixels, max_new_tokens=max_new_tokens, base_url=base_url,
            api_key_env=api_key_env, api_key_header=api_key_header, header=header,
            endpoint=endpoint, concurrency=concurrency, timeout=timeout,
            max_retries=max_retries, token_param=token_param, logprobs=logprobs,
            json_schema=json_schema)
    except (GroundingError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    detector = Detector(engine, batch_size=batch_size)
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
