"""grounding label: a folder of images into a resumable run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli import options as opt
from grounding.cli.backend import setup
from grounding.cli.common import fail, make_query, stderr_console
from grounding.cli.export import export_runs, parse_formats
from grounding.core.errors import GroundingError


@opt.with_options(detection=opt.DETECTION, backend_options=opt.BACKEND)
def label(
    images_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (created or resumed).")],
    classes: opt.Classes = None,
    ontology: opt.Ontology = None,
    prompt: Annotated[str | None, typer.Option(
        help="A full prompt replacing the built-in one for the classes.")] = None,
    points: opt.Points = False,
    reference: opt.References = None,
    format: Annotated[str | None, typer.Option(
        "--format", help="Datasets to export at the end: coco,yolo,labelstudio.")] = None,
    val_fraction: Annotated[float, typer.Option(help="YOLO export: validation share.")] = 0.2,
    seed: Annotated[int, typer.Option(help="YOLO export: split seed.")] = 0,
    shard: Annotated[str | None, typer.Option(
        help="Label only shard I of N (I/N, e.g. 0/4): a deterministic share of the images, "
             "for N machines into N run directories that `grounding export` merges.")] = None,
    retry_errors: Annotated[bool, typer.Option(help="Try the images that failed again.")
    ] = False,
    force: Annotated[bool, typer.Option(
        help="Start over if the configuration changed (old files are kept, renamed).")] = False,
    detection: opt.DetectionOptions | None = None,
    backend_options: dict | None = None,
) -> None:
    """Auto-label a folder of images into a run directory, resumably.

    Writes RUN_DIR/predictions.jsonl (one record per image, flushed as results arrive),
    RUN_DIR/errors.jsonl (images that failed, with the cause), RUN_DIR/run.json (the
    exact configuration) and RUN_DIR/summary.json. Run the same command again after a
    crash, Ctrl-C or kill -9: only what is missing is labelled.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from grounding.runs.labeling import label as run_label
    from grounding.runs.rundir import RunDir, parse_shard

    formats = parse_formats(format)
    try:
        shard_ix = parse_shard(shard)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard") from None
    if not images_dir.is_dir():
        raise typer.BadParameter(f"{images_dir} is not a directory", param_hint="IMAGES_DIR")
    engine, wanted, mapping = setup(backend_options, classes, ontology, prompt,
                                    max_new_tokens=detection.max_new_tokens,
                                    json_schema=detection.json_schema, need_classes=True)
    detector = detection.detector(engine)
    query = make_query(wanted, prompt, points=points, system=detection.system,
                       references=reference)
    run = RunDir(out)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]:.1f} img/s"),
               TextColumn("{task.fields[objects]} objects"),
               TextColumn("{task.fields[errors]} errors"), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console()) as bar:
        task = bar.add_task("labelling", total=None, rate=0.0, objects=0, errors=0)

        def show(p) -> None:
            bar.update(task, total=p.total, completed=p.done, rate=p.rate,
                       objects=p.objects, errors=p.errors)

        try:
            summary = run_label(detector, query, images_dir, run, shard=shard_ix,
                                retry_errors=retry_errors, force=force, ontology=mapping,
                                on_progress=show)
        except KeyboardInterrupt:
            typer.echo(f"interrupted: everything finished is in {run.predictions}; run the "
                       "same command to go on", err=True)
            raise typer.Exit(130) from None
        except GroundingError as exc:
            fail(exc)
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    for name in formats:
        export_runs([out], name, out / "export" / name, min_score=None, copy=False,
                    val_fraction=val_fraction, seed=seed, overwrite=True)
    if summary["session"]["errors"]:
        typer.echo(f"note: {summary['session']['errors']} images failed; see "
                   f"{run.errors} (--retry-errors tries them again)", err=True)
