"""grounding doctor: whether the local backend can run here, and how."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from grounding.backends.options import DEFAULT_MODEL
from grounding.cli.options import flag


def doctor(
    model: Annotated[str | None, typer.Option(
        help=f"Hub id or checkpoint directory to check (default {DEFAULT_MODEL}).")] = None,
    device: Annotated[str | None, typer.Option(
        help="The --device to check: cuda, cuda:N, cpu or auto (default: the backend's "
             "choice).")] = None,
    as_json: Annotated[bool, flag("--json", help="Print one JSON object instead.")] = False,
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
