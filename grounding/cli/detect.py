"""grounding detect: classes, a referring expression or points in images."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli import options as opt
from grounding.cli.backend import setup
from grounding.cli.common import check_out_dir, fail, make_query, stderr_console
from grounding.core.errors import GroundingError


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
    an overlay per image (DIR/<stem>.json, DIR/<stem>.jpg; two inputs with one stem get
    <stem>-2, <stem>-3, ..., so no input's files overwrite another's). A bad image gets a
    record with "error" set and the others still run. A server that cannot be reached
    stops the command at its first requests.
    """
    from rich.progress import Progress

    from grounding.runs.reach import ReachWatch, ServerUnreachable

    check_out_dir(out)
    for path in images:  # `--points true`: the flag took no value, "true" became an image
        if str(path).lower() in ("true", "false") and not path.exists():
            fail(f"no image {str(path)!r}: --points, --verify and the other switches take no "
                 "value (--points, not --points true)")
    engine, wanted, _ = setup(backend_options, classes, ontology, prompt,
                              max_new_tokens=detection.max_new_tokens,
                              json_schema=detection.json_schema,
                              per_class=detection.per_class)
    query = make_query(wanted, prompt, points=points, references=reference,
                       detection=detection)
    watch = ReachWatch(engine)
    try:
        segmenter = detection.segmenter(engine)
    except GroundingError as exc:  # a bad --mask-model: one line
        fail(exc)
    detector = watch.watching(detection.detector(engine, segmenter))
    names = OutputNames(out, images) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with Progress(transient=True, disable=len(images) < 2, console=stderr_console()) as bar:
        task = bar.add_task("detecting", total=len(images))
        results = watch.guard(detector.detect_query([str(p) for p in images], query))
        try:
            for path, result in zip(images, results, strict=True):
                failed += result.error is not None
                if names is None:
                    typer.echo(result.to_json())
                else:
                    stem = names.stem(path)
                    (out / f"{stem}.json").write_text(result.to_json(indent=1) + "\n",
                                                      encoding="utf-8")
                    if result.error is None:
                        result.annotate().save(out / f"{stem}.jpg", quality=90)
                bar.advance(task)
        except ServerUnreachable as exc:
            bar.stop()
            fail(exc)
        finally:
            results.close()
    if failed:
        typer.echo(f"error: {failed} of {len(images)} images failed (see their records)",
                   err=True)
        raise typer.Exit(1)


class OutputNames:
    """A stem per input under ``out`` that no other input's output takes: the file's
    own stem, else ``<stem>-2``, ``<stem>-3``, ... A stem is taken when this invocation
    gave it to an earlier input, when ``out/<stem>.json`` holds the record of another
    image (a rerun of the same command overwrites its own files, never another's), when
    ``out/<stem>.jpg`` exists without such a record, or when either file is an input."""

    def __init__(self, out: Path, inputs: list[Path]) -> None:
        self.out = out
        self.used: set[str] = set()
        self.inputs = {_real(p) for p in inputs}

    def stem(self, path: Path) -> str:
        n = 1
        while True:
            stem = path.stem if n == 1 else f"{path.stem}-{n}"
            if self._free(stem, path):
                self.used.add(stem)
                return stem
            n += 1

    def _free(self, stem: str, path: Path) -> bool:
        record, overlay = self.out / f"{stem}.json", self.out / f"{stem}.jpg"
        if stem in self.used or {_real(record), _real(overlay)} & self.inputs:
            return False
        if record.exists() or record.is_symlink():
            return _record_image(record) == str(path)
        return not (overlay.exists() or overlay.is_symlink())


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _record_image(path: Path) -> str | None:
    """The ``image`` of the record in ``path``, None when it holds none."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("image") if isinstance(record, dict) else None
