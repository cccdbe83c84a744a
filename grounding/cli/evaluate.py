"""grounding eval: a run against ground truth (mAP, precision, recall per class), and with
--sweep precision/recall/F1 per score threshold with a precision-recall plot."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from grounding.cli.common import fail
from grounding.core.errors import GroundingError

SHOWN_WARNINGS = 5
CORRECTIONS = "corrections"
"""``--gt corrections``: the run's reviewed boxes, RUN_DIR/corrections.jsonl."""
PLOT = Path("eval") / "pr_curve.png"
"""Where --sweep draws its plot, under the run directory (eval writes no other report
file: the table or JSON goes to stdout)."""
"""How many reasons for left-out ground-truth entries are printed (all are counted)."""


def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A label run directory.")],
    gt: Annotated[Path, typer.Option(
        help="Ground truth: a COCO json, a YOLO folder, a Pascal VOC folder (Annotations/, "
             "JPEGImages/), or the word 'corrections': the run's reviewed boxes "
             "(RUN_DIR/corrections.jsonl from grounding import-corrections), scoring only "
             "the reviewed images.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    iou_type: Annotated[str, typer.Option(
        help="bbox (boxes) or segm (masks of a run labelled with --masks, against a COCO "
             "ground truth with segmentation).")] = "bbox",
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="Precision, recall and F1 at IoU 0.5 for every score threshold (box "
                        "score, and verify score when boxes carry one), the best-F1 "
                        "threshold, and a precision-recall plot RUN_DIR/eval/pr_curve.png."
    )] = False,
    target_precision: Annotated[float | None, typer.Option(
        help="With --sweep (implies it): also the lowest threshold whose precision is at "
             "least this, in (0, 1].")] = None,
) -> None:
    """mAP@50, mAP@50:95, precision and recall per class of a run against ground truth
    (boxes; masks with --iou-type segm).

    Label a sample with each candidate prompt, model or pixel budget, evaluate each run
    against a small hand-labelled set, and keep the best before labelling everything.
    Ground-truth entries left out as malformed are listed on stderr; a ground truth with
    no images or no annotations is an error.

    --sweep says which --min-score (or --verify threshold) to export with: unscored boxes
    count at every threshold, as the exports keep them.
    """
    from grounding.core.result import InvalidResult
    from grounding.formats.dataset import DatasetError, relative_path
    from grounding.formats.evaluate import evaluate, load_corrections
    from grounding.io.storage import is_uri
    from grounding.runs.rundir import RunDir
    from grounding.runs.sources import image_base

    if iou_type not in ("bbox", "segm"):
        fail(f"--iou-type {iou_type!r}: choose from bbox, segm")
    if target_precision is not None:
        if not 0 < target_precision <= 1:
            fail(f"--target-precision {target_precision:g}: a precision in (0, 1]")
        sweep = True
    run = RunDir(run_dir)
    try:
        config = run.config()
    except GroundingError as exc:
        fail(exc)
    if not isinstance(config, dict) or not config.get("images_dir"):
        fail(f"{run.run_json} has no images_dir: is {run_dir} a grounding label run?")
    reviewed = str(gt) == CORRECTIONS
    if reviewed:
        gt = run_dir / "corrections.jsonl"
        if not gt.is_file() or not gt.read_text(encoding="utf-8", errors="replace").strip():
            fail(f"{gt}: no reviewed corrections; run `grounding import-corrections` first")
    elif not gt.exists():
        fail(f"ground truth {gt}: no such file or folder")
    base = image_base(config["images_dir"])  # a list's folder; a URI stays one
    classes = config.get("classes") or []
    try:
        if reviewed:  # the records' own keys, only the reviewed images
            truth = load_corrections(gt, classes)
            keys = {im.path for im in truth.images}
            report = evaluate((r for r in run.records()
                               if relative_path(str(r.get("image") or ""), None) in keys),
                              classes,
                              truth, iou_type=iou_type, sweep_scores=sweep,
                              target_precision=target_precision)
        else:
            report = evaluate(_export_names(run.records(), base), classes, gt,
                              images_root=None if is_uri(base) else Path(base),
                              iou_type=iou_type, sweep_scores=sweep,
                              target_precision=target_precision)
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
    plot = None
    if sweep:
        if not any(s.points for s in report.sweeps):
            fail(f"--sweep: no box of {run_dir} on the {report.images_matched} images scored "
                 "carries a score or a verify score: there is no threshold to sweep")
        from grounding.formats.sweep import plot as draw

        try:
            plot = draw(report.sweeps, run_dir / PLOT)
        except OSError as exc:
            fail(f"{exc.filename or run_dir / PLOT}: {exc.strerror or exc}")
    if as_json:
        data = report.to_dict()
        if plot is not None:
            data["pr_curve"] = str(plot)
            typer.echo(f"precision-recall plot: {plot}", err=True)
        typer.echo(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        console = Console()
        console.print(report.table())
        if plot is not None:
            from grounding.formats.sweep import table

            for s in report.sweeps:
                if s.points:
                    console.print(table(s))
            console.print(f"precision-recall plot: {plot}", soft_wrap=True, markup=False,
                          highlight=False)


def _export_names(records: Iterable[dict[str, Any]], base: str) -> Iterator[dict[str, Any]]:
    """Each record named as the exports name its image (relative to the images folder;
    a URI or a path outside it without its scheme or anchor: formats.common.locate), so
    a run over a list or a bucket matches a ground truth made from its export."""
    from grounding.formats.common import locate

    for record in records:
        image = record.get("image")
        found = locate(image, base) if isinstance(image, str) and image else None
        yield record if found is None or found[0] == image else {**record, "image": found[0]}
