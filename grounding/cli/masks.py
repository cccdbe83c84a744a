"""grounding masks: segment the boxes of a finished run into a new run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli import options as opt
from grounding.cli.common import check_out_dir, fail
from grounding.core.errors import GroundingError


def masks(
    run_dir: Annotated[Path, typer.Argument(help="A run with boxes (grounding label).")],
    out: Annotated[Path, typer.Option("--out", help="The new run: the same records, each "
                                                    "box with its mask.")],
    mask_model: Annotated[str | None, typer.Option(
        help="The segmenter checkpoint (default facebook/sam2.1-hiera-large).")] = None,
    device: Annotated[str | None, typer.Option(
        help="cuda, cuda:N or cpu (default: the first GPU, else the CPU).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images segmented at once.")] = 4,
    force: Annotated[bool, opt.flag(
        "--force", help="Start --out over if it was made otherwise (old files kept, "
                        "renamed).")] = False,
) -> None:
    """Add masks to a run without asking the detector again: every box of RUN_DIR is
    given to SAM 2 on its image, and the records, with masks, go into a new run that
    export and eval read like any other. Run it again to go on after a crash."""
    from grounding.backends.segment import DEFAULT_MASK_MODEL, SamSegmenter
    from grounding.runs.masks import add_masks
    from grounding.runs.rundir import RunDir

    check_out_dir(out)
    source = RunDir(run_dir)
    try:
        source.config()  # not a run: one line before a model is loaded
        segmenter = SamSegmenter(mask_model or DEFAULT_MASK_MODEL, device=device)
        summary = add_masks(source, RunDir(out), segmenter, batch_size=batch_size,
                            force=force)
    except (GroundingError, OSError) as exc:
        fail(exc)
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["errors"]:
        typer.echo(f"error: {summary['errors']} images could not be segmented; see "
                   f"{out / 'errors.jsonl'}", err=True)
        raise typer.Exit(1)
