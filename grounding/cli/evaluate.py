"""grounding eval: a run against ground truth (mAP, precision, recall per class)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from grounding.cli.common import fail
from grounding.core.errors import GroundingError

SHOWN_WARNINGS = 5
"""How many reasons for left-out ground-truth entries are printed (all are counted)."""


def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A label run directory.")],
    gt: Annotated[Path, typer.Option(help="Ground truth: a COCO json or a YOLO folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    iou_type: Annotated[str, typer.Option(
        help="bbox (boxes) or segm (masks of a run labelled with --masks, against a COCO "
             "ground truth with segmentation).")] = "bbox",
) -> None:
    """mAP@50, mAP@50:95, precision and recall per class of a run against ground truth
    (boxes; masks with --iou-type segm).

    Label a sample with each candidate prompt, model or pixel budget, evaluate each run
    against a small hand-labelled set, and keep the best before labelling everything.
    Ground-truth entries left out as malformed are listed on stderr; a ground truth with
    no images or no annotations is an error.
    """
    from grounding.core.result import InvalidResult
    from grounding.formats.dataset import DatasetError
    from grounding.formats.evaluate import evaluate
    from grounding.io.storage import is_uri
    from grounding.runs.rundir import RunDir
    from grounding.runs.sources import image_base

    if iou_type not in ("bbox", "segm"):
        fail(f"--iou-type {iou_type!r}: choose from bbox, segm")
    run = RunDir(run_dir)
    try:
        config = run.config()
    except GroundingError as exc:
        fail(exc)
    if not isinstance(config, dict) or not config.get("images_dir"):
        fail(f"{run.run_json} has no images_dir: is {run_dir} a grounding label run?")
    if not gt.exists():
        fail(f"ground truth {gt}: no such file or folder")
    base = image_base(config["images_dir"])  # a list's folder; a URI stays one
    try:
        report = evaluate(_export_names(run.records(), base), config.get("classes") or [],
                          gt, images_root=None if is_uri(base) else Path(base),
                          iou_type=iou_type)
    except DatasetError as exc:  # names the ground-truth file
        fail(exc)
    except InvalidResult as exc:  # names the record's image
        fail(f"{run.predictions}: {exc}")
    except OSError as exc:
        fail(f"{exc.filename or gt}: {exc.strerror or exc}")
    except (GroundingError, ValueError) as exc:
        fail(f"eval of {run_dir} against {gt}: {exc}")
    if report.gt_skipped:
        n = report.gt_skipped
        typer.echo(f"warning: {gt}: {n} ground-truth {'entry' if n == 1 else 'entries'} "
                   "left out as malformed:", err=True)
        for line in report.gt_warnings[:SHOWN_WARNINGS]:
            typer.echo(f"  {line}", err=True)
        if n > SHOWN_WARNINGS:
            typer.echo(f"  ... and {n - SHOWN_WARNINGS} more", err=True)
    if report.predictions_without_mask:
        typer.echo(f"warning: {report.predictions_without_mask} boxes of {run_dir} carry no "
                   "mask: left out of the mask scores", err=True)
    if not report.images_matched:
        typer.echo(f"warning: no record of {run_dir} matched an image of {gt}: nothing was "
                   "scored" + (f" (e.g. {report.examples[0]})" if report.examples else ""),
                   err=True)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console

        Console().print(report.table())


def _export_names(records: Iterable[dict[str, Any]], base: str) -> Iterator[dict[str, Any]]:
    """Each record named as the exports name its image (relative to the images folder;
    a URI or a path outside it without its scheme or anchor: formats.common.locate), so
    a run over a list or a bucket matches a ground truth made from its export."""
    from grounding.formats.common import locate

    for record in records:
        image = record.get("image")
        found = locate(image, base) if isinstance(image, str) and image else None
        yield record if found is None or found[0] == image else {**record, "image": found[0]}
