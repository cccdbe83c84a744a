"""grounding eval: a run against ground truth (mAP, precision, recall per class)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli.common import fail
from grounding.core.errors import GroundingError


def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A label run directory.")],
    gt: Annotated[Path, typer.Option(help="Ground truth: a COCO json or a YOLO folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """mAP@50, mAP@50:95, precision and recall per class of a run against ground truth.

    Label a sample with each candidate prompt, model or pixel budget, evaluate each run
    against a small hand-labelled set, and keep the best before labelling everything.
    """
    from grounding.formats.evaluate import evaluate
    from grounding.runs.rundir import RunDir

    run = RunDir(run_dir)
    try:
        config = run.config()
        report = evaluate(run.records(), config.get("classes") or [], gt,
                          images_root=Path(config["images_dir"]))
    except (GroundingError, OSError, ValueError) as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console

        Console().print(report.table())
