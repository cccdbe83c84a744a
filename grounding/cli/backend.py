"""The backend a command's options describe (the factory behind --backend), and what
the commands that run a model check before they build it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from grounding.backends.options import BACKENDS, LocalOptions
from grounding.cli.common import fail
from grounding.cli.options import cli_names
from grounding.core.errors import GeometryError, GroundingError


def check_budget(min_pixels: int | None, max_pixels: int | None, dialect: Any = None) -> None:
    """Raise GeometryError (one line) for a pixel budget no image can be sent under:
    a negative --min-pixels, --max-pixels under one pixel or under --min-pixels, or (with
    the dialect known) --max-pixels below the dialect's smallest model frame (factor x
    factor pixels)."""
    if min_pixels is not None and min_pixels < 0:
        raise GeometryError(f"--min-pixels {min_pixels} is negative")
    if max_pixels is not None and max_pixels < 1:
        raise GeometryError(f"--max-pixels {max_pixels}: give at least 1 pixel")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise GeometryError(f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}")
    if dialect is None or max_pixels is None:
        return
    from grounding.core.dialects import get_dialect

    d = get_dialect(dialect)
    if d.factor and d.fixed_size is None and max_pixels < d.factor * d.factor:
        raise GeometryError(
            f"--max-pixels {max_pixels} is below the smallest model frame of {d.name} "
            f"({d.factor}x{d.factor} = {d.factor * d.factor} pixels)")


def make_backend(kind: str, *, max_new_tokens: int, json_schema: bool,
                 describe: bool = False, **options: Any):
    """The backend the command-line options describe: ``options`` are the backend
    options by parameter name (grounding.cli.options.BACKEND), --backend aside. The pixel
    budget is checked before the backend is built (and, once the backend knows its
    dialect, against that dialect's smallest frame), so a budget no image fits is one
    error up front, not one per image. ``describe``: a local model is described from its
    config (grounding.backends.base.BackendSpec), not loaded: it runs elsewhere."""
    if kind not in BACKENDS:
        raise typer.BadParameter("expected local or openai", param_hint="--backend")
    values = {**options, "max_new_tokens": max_new_tokens, "json_schema": json_schema}
    settings = {field: values[name] for name, field in cli_names(BACKENDS[kind]).items()}
    check_budget(settings["min_pixels"], settings["max_pixels"], settings["dialect"])
    if kind == "local":
        from grounding.backends.local import LocalBackend

        settings["model"] = settings["model"] or LocalOptions.model
        backend = LocalBackend.describe(**settings) if describe else LocalBackend(**settings)
    else:
        if not settings["base_url"]:
            raise typer.BadParameter("--backend openai needs --base-url",
                                     param_hint="--base-url")
        settings["headers"] = _headers(settings["headers"])
        from grounding.backends.remote import OpenAIBackend

        backend = OpenAIBackend(**settings)
    try:
        check_budget(getattr(backend, "min_pixels", None), getattr(backend, "max_pixels", None),
                     backend.dialect)
    except GeometryError:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
        raise
    return backend


def _headers(items: list[str] | None) -> dict[str, str]:
    """--header 'Name: value' options as a dict."""
    headers = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise typer.BadParameter(f"expected 'Name: value', got {item!r}", param_hint="--header")
        headers[name.strip()] = value.strip()
    return headers


def engine(options: dict[str, Any], *, max_new_tokens: int, json_schema: bool,
           describe: bool = False):
    """The backend a command's options describe; exits 2 with one line when it cannot be
    had (a missing model, an unreachable server, a bad option value)."""
    settings = {k: v for k, v in options.items() if k != "backend"}
    try:
        return make_backend(options["backend"], max_new_tokens=max_new_tokens,
                            json_schema=json_schema, describe=describe, **settings)
    except (GroundingError, ValueError) as exc:
        fail(exc)


def build_detector(options: dict[str, Any], detection: Any, *, max_new_tokens: int,
                   json_schema: bool):
    """The Detector a command's options describe, built where it runs (a Ray worker:
    ``functools.partial`` of this pickles); raises GroundingError or ValueError."""
    settings = {k: v for k, v in options.items() if k != "backend"}
    backend = make_backend(options["backend"], max_new_tokens=max_new_tokens,
                           json_schema=json_schema, **settings)
    return detection.detector(backend, detection.segmenter(backend))


def setup(options: dict, classes: str | None, ontology: Path | None, prompt: str | None,
          *, max_new_tokens: int, json_schema: bool, need_classes: bool = False,
          per_class: bool | None = None, describe: bool = False):
    """(backend, classes-or-ontology, ontology dict) from a command's options; exits 2 with
    one line on a bad option, a missing model or an unreachable server."""
    from grounding.pipeline.detector import load_ontology

    if classes is not None and ontology is not None:
        raise typer.BadParameter("give --classes or --ontology, not both")
    if need_classes and classes is None and ontology is None:
        raise typer.BadParameter("give --classes or --ontology")
    if classes is None and ontology is None and prompt is None:
        raise typer.BadParameter("give --classes, --ontology or --prompt")
    if per_class and classes is None and ontology is None:
        raise typer.BadParameter("--per-class needs classes (--classes or --ontology)")
    if per_class and prompt and "{class}" not in prompt:
        raise typer.BadParameter("--per-class with --prompt needs {class} in the prompt, "
                                 "where each class goes", param_hint="--prompt")
    if classes is not None and not any(c.strip() for c in classes.split(",")):
        fail(f"--classes {classes!r} names no class: give them comma-separated, e.g. "
             '--classes "person,car"')
    try:
        mapping = load_ontology(ontology) if ontology is not None else None
    except GroundingError as exc:
        fail(exc)
    backend = engine(options, max_new_tokens=max_new_tokens, json_schema=json_schema,
                     describe=describe)
    return backend, mapping if mapping is not None else classes, mapping
