"""grounding import-corrections: a person's corrected boxes into a run's corrections.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from grounding.cli.common import fail
from grounding.core.errors import GroundingError

SOURCES = ("labelstudio", "cvat", "coco")


def run_import(run_dir: Path, file: Path, source: str | None) -> None:
    """Import ``file`` into ``run_dir`` and say what was done (exit 2 with one line when
    nothing can be)."""
    from grounding.runs.corrections import import_corrections
    from grounding.runs.rundir import RunDir

    if source is not None and source not in SOURCES:
        fail(f"--source {source!r}: choose from {', '.join(SOURCES)}")
    run = RunDir(run_dir)
    try:
        run.config()
    except GroundingError as exc:
        fail(exc)
    if not file.exists():
        fail(f"{file}: no such file")
    try:
        report = import_corrections(run, file, source=source)
    except GroundingError as exc:
        fail(exc)
    typer.echo(f"corrections: {report.imported} images ({report.boxes} boxes) from "
               f"{report.source} file {file} into {run.path / 'corrections.jsonl'}", err=True)
    if report.not_reviewed:
        typer.echo(f"  {report.not_reviewed} tasks not annotated (left as they were)", err=True)
    if report.unmatched:
        typer.echo(f"  {len(report.unmatched)} images not in the run, e.g. "
                   f"{report.unmatched[0]}", err=True)
    if report.rotated:
        typer.echo(f"  {report.rotated} rotated rectangles taken as the upright box around "
                   "them", err=True)
    if report.ignored_shapes:
        typer.echo(f"  {report.ignored_shapes} regions that are not boxes ignored", err=True)
    for line in report.skipped:
        typer.echo(f"  skipped {line}", err=True)


def import_corrections_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The label run the corrections are of.")],
    file: Annotated[Path, typer.Argument(
        help="A Label Studio JSON export (grounding review pull writes one), a CVAT for "
             "images 1.1 XML file or a COCO JSON file.")],
    source: Annotated[str | None, typer.Option(
        help="labelstudio, cvat or coco (default: from the file's content).")] = None,
) -> None:
    """Bring a person's corrected boxes home, into RUN_DIR/corrections.jsonl.

    Each reviewed image's boxes become one line (the last import of an image wins).
    Exports then use the human boxes of a corrected image (flagged reviewed; --no-corrections
    exports the model's), and grounding eval RUN_DIR --gt corrections scores the model on
    the reviewed images. A label that is not one of the run's classes is an error and
    nothing is imported.
    """
    run_import(run_dir, file, source)
