"""grounding export: COCO, YOLO, Pascal VOC, CVAT or Label Studio datasets from label runs
(also run by grounding label --format)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli.common import fail
from grounding.core.errors import GroundingError

FORMATS = ("coco", "yolo", "voc", "cvat", "labelstudio")


def parse_formats(text: str | None) -> list[str]:
    """The --format names (comma-separated), checked."""
    if not text:
        return []
    names = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad:
        raise typer.BadParameter(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}",
                                 param_hint="--format")
    return names


def export_runs(run_dirs: list[Path], fmt: str, out: Path, *, min_score: float | None,
                copy: bool, val_fraction: float, seed: int, overwrite: bool,
                url_prefix: str | None = None, mask_format: str = "rle",
                yolo_task: str = "detect", contours: str = "largest",
                corrections: bool = True) -> None:
    """Export the records of ``run_dirs`` (shards of one run) as ``fmt`` into ``out``;
    with ``corrections`` an image a person corrected (RUN_DIR/corrections.jsonl) goes
    out with the human boxes, flagged reviewed (grounding.runs.corrections)."""
    from grounding.formats import (
        ExportExists,
        export_coco,
        export_cvat,
        export_labelstudio,
        export_voc,
        export_yolo,
    )
    from grounding.formats.labelstudio import LOCAL_FILES_PREFIX
    from grounding.runs.rundir import RunDir
    from grounding.runs.sources import image_base

    runs = [RunDir(p) for p in run_dirs]
    try:
        configs = [r.config() for r in runs]
    except GroundingError as exc:
        fail(exc)
    classes = configs[0].get("classes") or []
    roots = {c.get("images_dir") for c in configs}
    if any((c.get("classes") or []) != classes for c in configs) or len(roots) != 1:
        fail("the run directories differ in classes or images folder; export them "
             "separately")
    root = image_base(roots.pop())  # a list's folder; a URI stays a URI
    if fmt == "yolo" and yolo_task == "segment" and not any(
            d.get("mask") for run in runs for r in run.records()
            for d in r.get("detections") or []):
        fail(f"--yolo-task segment: no box of {', '.join(map(str, run_dirs))} has a mask; "
             "label with --masks, or add masks with grounding masks RUN_DIR --out NEW_RUN")

    from grounding.runs.corrections import apply_corrections, read_corrections

    def records():
        # Shards never overlap; the exporters skip (and list) a repeated image anyway.
        for run in runs:
            fixes = read_corrections(run) if corrections else {}
            yield from apply_corrections(run.records(), fixes)

    try:
        if fmt == "coco":
            stats = export_coco(records(), root, classes, out, min_score=min_score, copy=copy,
                                overwrite=overwrite, mask_format=mask_format)
        elif fmt == "yolo":
            stats = export_yolo(records(), root, classes, out, val_fraction=val_fraction,
                                seed=seed, min_score=min_score, copy=copy, overwrite=overwrite,
                                task=yolo_task, contours=contours)
        elif fmt in ("voc", "cvat"):
            exporter = export_voc if fmt == "voc" else export_cvat
            stats = exporter(records(), root, classes, out, min_score=min_score, copy=copy,
                             overwrite=overwrite)
        else:
            stats = export_labelstudio(
                records(), root, classes, out, min_score=min_score, overwrite=overwrite,
                url_prefix=LOCAL_FILES_PREFIX if url_prefix is None else url_prefix,
                mask_format=mask_format)
    except ExportExists as exc:
        fail(f"{fmt} export to {out}: {exc.path} {exc.what}; pass --overwrite to replace it")
    except (FileExistsError, ValueError, OSError) as exc:
        fail(f"{fmt} export to {out}: {exc}")
    counts = {k: v for k, v in stats.to_dict().items() if v and k != "skipped"}
    typer.echo(f"{fmt}: {out} {json.dumps(counts)}", err=True)
    for line in stats.skipped[:20]:
        typer.echo(f"  skipped {line}", err=True)


def export(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (shards merge).")],
    format: Annotated[str, typer.Option(
        "--format", help="coco, yolo, voc (Pascal VOC), cvat (CVAT for images 1.1) or "
                         "labelstudio; several, comma-separated, each go to OUT/FORMAT.")],
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default RUN_DIR/export/FORMAT).")] = None,
    min_score: Annotated[float | None, typer.Option(
        help="Drop boxes scored below this (unscored boxes count as 1.0).")] = None,
    copy: Annotated[bool, typer.Option(
        help="Copy images instead of linking them (supervision's COCO reader needs copies; "
             "copy images you mean to zip, e.g. a CVAT upload).")
    ] = False,
    val_fraction: Annotated[float, typer.Option(help="YOLO: validation share.")] = 0.2,
    seed: Annotated[int, typer.Option(help="YOLO: split seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a previous export in --out (its images/ and labels/ "
                            "folders, or tasks.json, ...); never the source images.")] = False,
    url_prefix: Annotated[str | None, typer.Option(
        help="Label Studio: what goes before each image's path under the images folder in "
             "the task URLs. Default /data/local-files/?d= (Label Studio serving local "
             "files with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT = the images folder); "
             "e.g. /data/local-files/?d=photos/ when the document root is the folder "
             "above, or http://host:8081/ for a file server.")] = None,
    mask_format: Annotated[str | None, typer.Option(
        help="Masks (runs labelled with --masks), coco and labelstudio: rle (default; COCO "
             "RLE, Label Studio brush) or polygon (the mask's outer contours).")] = None,
    yolo_task: Annotated[str, typer.Option(
        help="YOLO: detect (box rows) or segment (one polygon row per box with a mask; "
             "boxes without one are left out; train with task=segment).")] = "detect",
    contours: Annotated[str | None, typer.Option(
        help="YOLO segment: largest (default; the mask's largest contour) or all (every "
             "contour joined into one polygon, as Ultralytics' convert_coco does).")] = None,
    no_corrections: Annotated[bool, typer.Option(
        "--no-corrections", help="Export the model's boxes only: ignore the human "
                                 "corrections in RUN_DIR/corrections.jsonl (grounding "
                                 "import-corrections), which are used by default.")] = False,
) -> None:
    """Build COCO, YOLO, Pascal VOC, CVAT or Label Studio datasets from one or more label
    runs."""
    names = list(dict.fromkeys(parse_formats(format)))
    if not names:
        raise typer.BadParameter("give a format", param_hint="--format")
    if url_prefix is not None and "labelstudio" not in names:
        raise typer.BadParameter("only for --format labelstudio", param_hint="--url-prefix")
    choices = {"--mask-format": (mask_format, ("rle", "polygon"), ("coco", "labelstudio")),
               "--yolo-task": (yolo_task, ("detect", "segment"), ("yolo",)),
               "--contours": (contours, ("largest", "all"), ("yolo",))}
    for option, (value, allowed, formats) in choices.items():
        if value is not None and value not in allowed:
            fail(f"{option} {value!r}: choose from {', '.join(allowed)}")
        if value is not None and not set(names) & set(formats) and value != allowed[0]:
            fail(f"{option} is only for --format {' or '.join(formats)}")
    if contours is not None and yolo_task != "segment":
        fail("--contours is only for --yolo-task segment")
    # RUN_DIR/export/FORMAT belongs to grounding and is rebuilt; a folder of the user's
    # (--out) must be empty, so an export never mixes into an existing dataset, unless
    # --overwrite says to replace what a previous export left there.
    # Several formats: each in a folder of its own under --out (or RUN_DIR/export).
    for fmt in names:
        if out is None:
            target = run_dirs[0] / "export" / fmt
        else:
            target = out if len(names) == 1 else out / fmt
        export_runs(run_dirs, fmt, target, min_score=min_score, copy=copy,
                    val_fraction=val_fraction, seed=seed, overwrite=overwrite or out is None,
                    url_prefix=url_prefix if fmt == "labelstudio" else None,
                    mask_format=(mask_format or "rle") if fmt in ("coco", "labelstudio")
                    else "rle",
                    yolo_task=yolo_task if fmt == "yolo" else "detect",
                    contours=contours or "largest", corrections=not no_corrections)
