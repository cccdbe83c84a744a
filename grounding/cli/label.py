"""grounding label: a folder of images into a resumable run directory."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli import options as opt
from grounding.cli.backend import setup
from grounding.cli.common import check_out_dir, fail, make_query, stderr_console
from grounding.cli.export import export_runs, parse_formats
from grounding.core.errors import GroundingError


@opt.with_options(detection=opt.DETECTION, backend_options=opt.BACKEND)
def label(
    images: Annotated[str, typer.Argument(
        metavar="IMAGES",
        help="A folder of images (searched recursively; grounding's own output in it is "
             "skipped), a list of image paths (.txt, .jsonl or .parquet), or either on "
             "object storage (s3://bucket/prefix, gs://..., anything pyarrow or fsspec "
             "reads).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (created or resumed).")],
    classes: opt.Classes = None,
    ontology: opt.Ontology = None,
    prompt: Annotated[str | None, typer.Option(
        help="A full prompt replacing the built-in one for the classes.")] = None,
    points: opt.Points = False,
    reference: opt.References = None,
    format: Annotated[str | None, typer.Option(
        "--format", help="Datasets to export at the end: coco,yolo,voc,cvat,labelstudio.")] = None,
    val_fraction: Annotated[float, typer.Option(help="YOLO export: validation share.")] = 0.2,
    seed: Annotated[int, typer.Option(help="YOLO export: split seed.")] = 0,
    shard: Annotated[str | None, typer.Option(
        help="Label only shard I of N (I/N, e.g. 0/4): a deterministic share of the images, "
             "for N machines into N run directories that `grounding export` merges.")] = None,
    retry_errors: Annotated[bool, opt.flag(
        "--retry-errors", help="Try the images that failed again.")] = False,
    force: Annotated[bool, opt.flag(
        "--force", help="Start over if the configuration changed (old files are kept, "
                        "renamed).")] = False,
    engine: Annotated[str, typer.Option(
        "--engine", help="Where the model runs: local (this process) or ray (a pool of "
                         "workers on a Ray cluster; pip install 'grounding\\[ray]'). A run "
                         "resumes under either.")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="ray: the cluster to join (auto: the one `ray start` runs "
                              "here; host:6379; ray://host:10001). Default, as Ray's own: "
                              "RAY_ADDRESS, else a cluster `ray start` runs on this "
                              "machine, else a new Ray here.")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="ray: workers in the pool (default: one per GPU with the "
                                 "local backend; with a server, one per 8 of its "
                                 "--concurrency, which they share).")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(
        "--gpus-per-worker", min=0, help="ray: GPUs each worker holds (default 1 with the "
                                         "local backend on a cluster with GPUs, else 0)."
    )] = None,
    detection: opt.DetectionOptions | None = None,
    backend_options: dict | None = None,
) -> None:
    """Auto-label a folder of images into a run directory, resumably.

    Writes RUN_DIR/predictions.jsonl (one record per image, flushed as results arrive),
    RUN_DIR/errors.jsonl (the images failing now, one line each with the cause; every
    failure is kept in errors.history.jsonl), RUN_DIR/run.json (the exact configuration)
    and RUN_DIR/summary.json. Run the same command again after a crash, Ctrl-C or kill
    -9: only what is missing is labelled. The run directory, other runs and exported
    datasets inside the images folder are never labelled. A server that cannot be
    reached stops the run at its first requests, recording nothing. With --engine ray
    the same run is spread over a Ray cluster's workers (README: "Labelling on a Ray
    cluster").
    """
    from grounding.runs.labeling import label as run_label
    from grounding.runs.rundir import RunDir, parse_shard
    from grounding.runs.sources import open_images

    formats = parse_formats(format)
    try:
        shard_ix = parse_shard(shard)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard") from None
    on_ray = _engine(engine, ray_address, workers, gpus_per_worker)
    check_out_dir(out)
    try:  # before the model is loaded: a mistyped folder costs one line, not a load
        image_set = open_images(images, [out])
    except GroundingError as exc:
        fail(exc)
    backend, wanted, mapping = setup(backend_options, classes, ontology, prompt,
                                     max_new_tokens=detection.max_new_tokens,
                                     json_schema=detection.json_schema,
                                     per_class=detection.per_class, need_classes=True,
                                     describe=on_ray)
    try:
        segmenter = detection.segmenter(backend, describe=on_ray)
    except GroundingError as exc:  # a bad --mask-model: one line
        fail(exc)
    detector = detection.detector(backend, segmenter)
    query = make_query(wanted, prompt, points=points, references=reference,
                       detection=detection)
    runner = None
    if on_ray:
        runner = _ray_engine(backend_options, detection, ray_address, workers,
                             gpus_per_worker, getattr(backend, "concurrency", None))
        close = getattr(backend, "close", None)  # the driver's own client only described
        if close is not None:
            close()
    run = RunDir(out)
    progress = LabelProgress()
    try:
        summary = run_label(detector, query, image_set, run, shard=shard_ix,
                            retry_errors=retry_errors, force=force, ontology=mapping,
                            on_progress=progress.show, engine=runner)
    except KeyboardInterrupt:
        progress.stop()
        typer.echo(f"interrupted: everything finished is in {run.predictions}; run the "
                   "same command to go on", err=True)
        raise typer.Exit(130) from None
    except (GroundingError, OSError) as exc:  # a changed configuration, no images, no server
        progress.stop()
        fail(exc)
    finally:
        progress.stop()
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    for name in formats:
        export_runs([out], name, out / "export" / name, min_score=None, copy=False,
                    val_fraction=val_fraction, seed=seed, overwrite=True)
    failing, session = summary["errors"], summary["session"]["errors"]
    if failing:
        typer.echo(f"error: {failing} images of this run failed ({session} in this session); "
                   f"see {run.errors} (--retry-errors tries them again)", err=True)
        raise typer.Exit(1)


def _engine(name: str, address: str | None, workers: int | None,
            gpus_per_worker: float | None) -> bool:
    """Whether the run goes on Ray; one line for a misused engine option (before
    anything loads)."""
    if name not in ("local", "ray"):
        raise typer.BadParameter(f"expected local or ray, got {name!r}", param_hint="--engine")
    if name == "local":
        for given, option in ((address, "--ray-address"), (workers, "--workers"),
                              (gpus_per_worker, "--gpus-per-worker")):
            if given is not None:
                raise typer.BadParameter(f"{option} needs --engine ray", param_hint=option)
        return False
    from grounding.runs.ray_engine import require_ray

    try:
        require_ray()
    except GroundingError as exc:
        fail(exc)
    return True


def _ray_engine(backend_options: dict, detection, address: str | None, workers: int | None,
                gpus_per_worker: float | None, concurrency: int | None):
    """The RayEngine of these options: each worker builds the detector the options
    describe; a server's --concurrency is shared by the workers driving it."""
    from grounding.cli.backend import build_detector
    from grounding.runs.ray_engine import RayEngine, server_workers

    options = dict(backend_options)
    if concurrency:
        workers = workers or server_workers(concurrency)
        options["concurrency"] = max(1, math.ceil(concurrency / workers))
    build = functools.partial(build_detector, options, detection,
                              max_new_tokens=detection.max_new_tokens,
                              json_schema=detection.json_schema)
    return RayEngine(build, address=address, workers=workers,
                     gpus_per_worker=gpus_per_worker)


class LabelProgress:
    """The progress bar of a label run, started by the run's first progress report (so
    a run refused before it starts prints no bar)."""

    def __init__(self) -> None:
        self.bar = None
        self.task = None

    def show(self, p) -> None:
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[rate]:.1f} img/s"),
                       TextColumn("{task.fields[objects]} objects"),
                       TextColumn("{task.fields[errors]} errors"), TimeRemainingColumn())
            self.bar = Progress(*columns, console=stderr_console())
            self.bar.start()
            self.task = self.bar.add_task("labelling", total=p.total, rate=0.0, objects=0,
                                          errors=0)
        self.bar.update(self.task, total=p.total, completed=p.done, rate=p.rate,
                        objects=p.objects, errors=p.errors)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
