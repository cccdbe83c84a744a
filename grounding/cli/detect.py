"""grounding detect: classes, a referring expression or points in images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from grounding.cli import options as opt
from grounding.cli.backend import setup
from grounding.cli.common import make_query, stderr_console


@opt.with_options(detection=opt.DETECTION, backend_options=opt.BACKEND)
def detect(
    images: Annotated[list[Path], typer.Argument(help="Image files to look at.")],
    classes: opt.Classes = None,
    ontology: opt.Ontology = None,
    prompt: Annotated[str | None, typer.Option(
        help="A referring expression to locate (\"the red car on the left\"), or with "
             "--classes/--ontology a full prompt replacing the built-in one.")] = None,
    points: opt.Points = False,
    reference: opt.References = None,
    out: Annotated[Path | None, typer.Option(
        help="Write DIR/<stem>.json and an overlay DIR/<stem>.jpg per image instead of "
             "JSON lines on stdout.")] = None,
    detection: opt.DetectionOptions | None = None,
    backend_options: dict | None = None,
) -> None:
    """Find classes, a referring expression, or points in images.

    The model runs locally (transformers) or on a server (--backend openai --base-url URL).

    Prints one JSON record per image (one per line) or, with --out, writes a record and
    an overlay per image. A bad image gets a record with "error" set; the others still
    run, and the exit status is 1 if any image failed.
    """
    from rich.progress import Progress

    engine, wanted, _ = setup(backend_options, classes, ontology, prompt,
                              max_new_tokens=detection.max_new_tokens,
                              json_schema=detection.json_schema)
    query = make_query(wanted, prompt, points=points, system=detection.system,
                       references=reference)
    detector = detection.detector(engine)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    stems: dict[str, int] = {}
    with Progress(transient=True, disable=len(images) < 2, console=stderr_console()) as bar:
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
