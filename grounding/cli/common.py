"""What the commands share beyond their options: failing with one line, the console for
progress, the query of the commands that run a model."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from grounding.core.errors import GroundingError


def fail(message: object, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def make_query(wanted, prompt: str | None, *, points: bool, system: str | None,
               references: list[Path] | None):
    """The Query of a command's options; exits 2 with one line on a bad reference image."""
    from grounding.pipeline.detector import Query

    try:
        return Query.make(wanted, prompt, points=points, system=system,
                          references=[str(p) for p in references or []])
    except GroundingError as exc:
        fail(f"reference image {exc}")
