"""grounding merge: fuse runs over the same images into a new run (ensembles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli import options as opt
from grounding.cli.common import check_out_dir, fail
from grounding.core.errors import GroundingError


def merge(
    runs: Annotated[list[Path], typer.Argument(
        help="Two or more run directories over the same images folder, with the same "
             "classes (other prompts, pixel budgets, models, tilings).")],
    out: Annotated[Path, typer.Option("--out", help="The merged run directory.")],
    method: Annotated[str, typer.Option(
        help="wbf: weighted box fusion (needs the ensemble-boxes package); nms: keep the "
             "best-ranked of overlapping boxes; vote: keep boxes found by --min-votes "
             "runs, averaged.")] = "wbf",
    iou: Annotated[float, typer.Option(
        help="Boxes of one class overlapping by more than this IoU are one object.")
    ] = 0.55,
    min_votes: Annotated[int | None, typer.Option(
        help="vote: how many runs must have found a box (default: a majority).")] = None,
    force: Annotated[bool, opt.flag(
        "--force", help="Replace a merge in --out made with other runs or settings (its "
                        "files are kept, renamed).")] = False,
) -> None:
    """Fuse the records of runs over the same images into a new run that export and eval
    read like any other.

    Boxes of one class that overlap are one object: wbf averages them (weighted by
    score), nms keeps the best-ranked one, vote keeps those at least --min-votes runs
    found. Each box says how many runs found it and which (attributes votes, sources);
    points of all runs are kept. Only images done in every run are merged; the others
    are listed in OUT/errors.jsonl with the runs that lack them. Running the same merge
    again redoes it (nothing duplicated). Exit status: 0 every image merged; 1 some
    images were not (see errors.jsonl); 2 the merge was refused (one line says why).
    """
    from grounding.runs.merge import merge_runs

    check_out_dir(out)
    try:
        summary = merge_runs(runs, out, method=method.strip().lower(), iou=iou,
                             min_votes=min_votes, force=force)
    except (GroundingError, OSError) as exc:
        fail(exc)
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["errors"]:
        typer.echo(f"error: {summary['errors']} images were not merged (not done in every "
                   f"run); {out / 'errors.jsonl'} names the runs that lack them", err=True)
        raise typer.Exit(1)
