"""grounding review: pick the labels most worth a person's look and send them to Label
Studio (or CVAT); review push / review pull talk to a Label Studio server.

Shape: ``grounding review RUN_DIR --out DIR`` builds the review folder (it is the
``select`` subcommand, which a first argument that is not ``push``, ``pull`` or
``select`` runs: a run directory named ``push`` is ``grounding review select push``);
``grounding review push PATH`` and ``grounding review pull PATH`` take the review folder
or the run directory whose ``review/`` it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from grounding.cli.common import check_out_dir, fail
from grounding.core.errors import GroundingError

DEFAULT_COMMAND = "select"
REVIEW_FORMATS = ("labelstudio", "cvat")
API_KEY_ENV = "LABEL_STUDIO_API_KEY"


class DefaultGroup(TyperGroup):
    """A group whose first argument, when it is not one of its commands (or --help),
    goes to :data:`DEFAULT_COMMAND`: ``grounding review RUN_DIR`` is
    ``grounding review select RUN_DIR``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def select(
    run_dir: Annotated[Path, typer.Argument(help="A label run directory.")],
    out: Annotated[Path | None, typer.Option(
        help="The review folder (default RUN_DIR/review).")] = None,
    budget: Annotated[int, typer.Option(help="At most this many images.")] = 100,
    strategy: Annotated[str, typer.Option(
        help="uncertain (the most doubtful first: low box scores, verify disagreeing, "
             "truncated or repeating answers, labels matching no class, nothing found), "
             "random, or mixed (20% of the budget drawn at random from all images, for an "
             "unbiased precision estimate, the rest uncertain).")] = "uncertain",
    format: Annotated[str, typer.Option(
        "--format", help="labelstudio (tasks.json with predictions + label_config.xml) or "
                         "cvat (CVAT for images 1.1: annotations.xml + images/).")
    ] = "labelstudio",
    seed: Annotated[int, typer.Option(help="Seed of the random draws.")] = 0,
    url_prefix: Annotated[str | None, typer.Option(
        help="Label Studio: what goes before each image's path in the task URLs (as for "
             "grounding export; default /data/local-files/?d=).")] = None,
    include_reviewed: Annotated[bool, typer.Option(
        "--include-reviewed", help="Also choose images already corrected "
                                   "(RUN_DIR/corrections.jsonl); left out by default.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a previous review in --out.")] = False,
) -> None:
    """Choose the images most worth a person's look, as a Label Studio or CVAT task.

    The selection and why each image was chosen go to OUT/selection.jsonl, what was asked
    to OUT/review.json. Then: grounding review push (Label Studio), the reviewers, grounding
    review pull, grounding import-corrections RUN_DIR FILE.
    """
    from grounding.formats.labelstudio import LOCAL_FILES_PREFIX
    from grounding.runs.corrections import apply_corrections, read_corrections
    from grounding.runs.review import STRATEGIES, select_for_review, write_selection
    from grounding.runs.rundir import RunDir
    from grounding.runs.sources import image_base

    if strategy not in STRATEGIES:
        fail(f"--strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if format not in REVIEW_FORMATS:
        fail(f"--format {format!r}: choose from {', '.join(REVIEW_FORMATS)}")
    if budget < 1:
        fail(f"--budget {budget}: give at least 1")
    if url_prefix is not None and format != "labelstudio":
        fail("--url-prefix is only for --format labelstudio")
    check_out_dir(out)
    run = RunDir(run_dir)
    try:
        config = run.config()
    except GroundingError as exc:
        fail(exc)
    if not config.get("images_dir"):
        fail(f"{run.run_json} has no images_dir: is {run_dir} a grounding label run?")
    target = out if out is not None else run.path / "review"
    if target.resolve() == run.path.resolve():
        fail(f"--out {out}: that is the run directory; give the review a folder of its own "
             "(default RUN_DIR/review)")
    if out is not None and not overwrite and (target / "review.json").exists():
        fail(f"{target} already holds a review; pass --overwrite to replace it")
    fixes = read_corrections(run)
    records = {r["image"]: r for r in apply_corrections(run.records(), fixes)
               if isinstance(r.get("image"), str)}
    choices = select_for_review(records.values(), budget, strategy, seed,
                                exclude=() if include_reviewed else fixes)
    if not choices:
        fail(f"nothing selected: {run_dir} has no reviewable image"
             + (" with a reason to doubt it (try --strategy mixed or random)"
                if strategy == "uncertain" and records else "")
             + (" that is not reviewed already" if fixes and not include_reviewed else ""))
    chosen = [records[c.image] for c in choices]
    classes = config.get("classes") or []
    root = image_base(config["images_dir"])
    try:
        if format == "labelstudio":
            from grounding.formats.labelstudio import export_labelstudio

            stats = export_labelstudio(chosen, root, classes, target, overwrite=True,
                                       url_prefix=url_prefix or LOCAL_FILES_PREFIX)
        else:
            from grounding.formats.cvat import export_cvat

            stats = export_cvat(chosen, root, classes, target, overwrite=True)
    except (FileExistsError, ValueError, OSError) as exc:
        fail(f"review of {run_dir} to {target}: {exc}")
    for stale in ("push.json", "labelstudio-export.json"):  # the old review's project
        (target / stale).unlink(missing_ok=True)
    write_selection(target, choices, run_dir=run.path, strategy=strategy, budget=budget,
                    seed=seed, fmt=format, considered=len(records))
    counts: dict[str, int] = {}
    for c in choices:
        for reason in c.reasons:
            counts[reason] = counts.get(reason, 0) + 1
    reviewed = 0 if include_reviewed else sum(1 for k in records if k in fixes)
    typer.echo(f"review: {target} {len(choices)} of {len(records) - reviewed} images "
               f"{json.dumps(counts)}"
               + (f" ({reviewed} already reviewed left out)" if reviewed else ""), err=True)
    for line in stats.skipped[:20]:
        typer.echo(f"  skipped {line}", err=True)


def _api_key(env: str) -> str:
    key = os.environ.get(env)
    if not key:
        fail(f"set {env} to your Label Studio API key (Account & Settings → Access "
             "Token); the key is never passed on the command line")
    return key


def push(
    path: Annotated[Path, typer.Argument(
        help="The review folder (or the run directory whose review/ it is).")],
    url: Annotated[str | None, typer.Option(
        help="Label Studio's address, e.g. http://localhost:8080 (default: "
             "$LABEL_STUDIO_URL).")] = None,
    api_key_env: Annotated[str, typer.Option(
        help="The environment variable holding the API key.")] = API_KEY_ENV,
    project: Annotated[str | None, typer.Option(
        help="The project's title (default: the run's folder name + ' review').")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Push again: create another project.")] = False,
) -> None:
    """Create a Label Studio project holding the review, grounding's boxes as predictions.

    The tasks are imported with their predictions through label-studio-sdk, so reviewers
    start from grounding's boxes; the project's id and address go to REVIEW/push.json."""
    from grounding.runs.review import ReviewError, connect, push_review, read_json, review_dir

    try:
        folder = review_dir(path)
        info = read_json(folder / "review.json")
    except ReviewError as exc:
        fail(exc)
    url = url or os.environ.get("LABEL_STUDIO_URL")
    if not url:
        fail("give --url (Label Studio's address) or set LABEL_STUDIO_URL")
    key = _api_key(api_key_env)
    title = project or f"{Path(info.get('run_dir') or folder).name} review"
    try:
        with connect(url, key) as client:
            record = push_review(folder, client, url, title=title, force=force)
    except ReviewError as exc:
        fail(exc)
    typer.echo(f"pushed {record['tasks']} tasks to {record['project_url']} "
               f"(project {record['project_id']}, {record['project_title']!r})", err=True)


def pull(
    path: Annotated[Path, typer.Argument(
        help="The review folder (or the run directory whose review/ it is).")],
    url: Annotated[str | None, typer.Option(
        help="Label Studio's address (default: where push sent it, else "
             "$LABEL_STUDIO_URL).")] = None,
    api_key_env: Annotated[str, typer.Option(
        help="The environment variable holding the API key.")] = API_KEY_ENV,
    project: Annotated[str | None, typer.Option(
        help="The project, by id or title (default: the one push created).")] = None,
    import_: Annotated[bool, typer.Option(
        "--import", help="Also import the annotations as corrections of the run.")
    ] = False,
) -> None:
    """Fetch the reviewers' annotations back from Label Studio.

    They go to REVIEW/labelstudio-export.json (a Label Studio JSON export); import them with
    grounding import-corrections RUN_DIR FILE, or pass --import."""
    from grounding.runs.review import (
        PUSH_FILE,
        ReviewError,
        connect,
        find_project,
        pull_review,
        read_json,
        review_dir,
    )

    try:
        folder = review_dir(path)
        info = read_json(folder / "review.json")
        pushed = read_json(folder / PUSH_FILE) if (folder / PUSH_FILE).exists() else {}
    except ReviewError as exc:
        fail(exc)
    url = url or pushed.get("url") or os.environ.get("LABEL_STUDIO_URL")
    if not url:
        fail("give --url (Label Studio's address) or set LABEL_STUDIO_URL")
    if project is None and not pushed:
        fail(f"{folder} was not pushed (no {PUSH_FILE}): give --project ID or TITLE")
    key = _api_key(api_key_env)
    try:
        with connect(url, key) as client:
            project_id = (find_project(client, project) if project is not None
                          else int(pushed["project_id"]))
            file, n, annotated = pull_review(folder, client, project_id)
    except ReviewError as exc:
        fail(exc)
    typer.echo(f"pulled {n} tasks ({annotated} annotated) of project {project_id} to {file}",
               err=True)
    run_dir = info.get("run_dir")
    if import_:
        from grounding.cli.corrections import run_import

        run_import(Path(run_dir), file, None)
    else:
        typer.echo(f"next: grounding import-corrections {run_dir} {file}", err=True)
