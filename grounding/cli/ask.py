"""grounding ask: a question about each detection of a record, or about all of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli.backend import engine as make_engine
from grounding.cli.common import fail
from grounding.cli.options import BACKEND, MaxNewTokens, System, with_options
from grounding.core.errors import GroundingError

ASK_MAX_NEW_TOKENS = 256
"""An answer about one box is short: ask's --max-new-tokens default."""


@with_options(backend_options=BACKEND)
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
    max_new_tokens: MaxNewTokens = ASK_MAX_NEW_TOKENS,
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

    from grounding.io.images import load_image
    from grounding.io.records import read_records
    from grounding.pipeline.qa import ask_with_answers, first_object, result_for_image

    if about not in ("each", "all"):
        raise typer.BadParameter("expected each or all", param_hint="--about")
    try:
        result = result_for_image(read_records(detections), image, detections)
        picture = load_image(image)
        if picture.size != result.image_size:
            raise GroundingError(
                f"{image} is {picture.width}x{picture.height} but the record is for "
                f"{result.width}x{result.height} ({detections}): is it the image the "
                "detections were made on?")
    except GroundingError as exc:
        fail(exc)
    if not question.strip():
        raise typer.BadParameter("the question is empty", param_hint="QUESTION")
    engine = make_engine(backend_options, max_new_tokens=max_new_tokens, json_schema=False)
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
