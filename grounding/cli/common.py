"""What the commands share beyond their options: failing with one line, the exit
status, the console for progress, the query of the commands that run a model."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from grounding.cli import options as opt
from grounding.core.errors import GroundingError

EXIT_STATUS = ("Exit status: 0 every image done; 1 some images failed (their records say "
               "why; label lists them in errors.jsonl); 2 nothing could start (a bad option, "
               "no model, a server that cannot be reached, no images); 130 interrupted.")
"""The exit status of the commands that run a model over images (detect, label): their
--help epilog, and README's table."""


def fail(message: object, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def check_out_dir(out: Path | None, option: str = "--out") -> None:
    """Exit 2 with one line when ``out`` exists and is not a directory."""
    if out is not None and out.exists() and not out.is_dir():
        fail(f"{option} {out} is a file, not a directory")


def make_query(wanted, prompt: str | None, *, points: bool, references: list[Path] | None,
               detection):
    """The Query of a command's options (``detection``: its DetectionOptions); exits 2
    with one line on a bad reference image or a bad combination."""
    from grounding.pipeline.query import Query

    tiling = detection.tiling()
    try:
        return Query.make(wanted, prompt, points=points, system=detection.system,
                          references=[str(p) for p in references or []],
                          per_class=detection.per_class, tiling=tiling,
                          keys=opt.keys(detection.box_key, detection.point_key,
                                        detection.label_key))
    except GroundingError as exc:
        fail(f"reference image {exc}")
    except ValueError as exc:  # an ontology naming no class, --per-class without classes
        fail(exc)
