"""Which labels of a run a person should look at first, and the review folder for them.

:func:`select_for_review` reads a run's records and picks at most ``budget`` images:

- ``uncertain``: the images with a reason to doubt them, highest :func:`priority` first;
  an image with no reason is not chosen, so fewer than ``budget`` may come back.
- ``random``: ``budget`` images drawn uniformly (seeded) from all reviewable images.
- ``mixed``: a random share (:data:`RANDOM_SHARE`, 20%, rounded, at least 1 when the budget
  is 2 or more) drawn uniformly from *all* reviewable images first, then the rest of the
  budget by priority from the others. The images chosen for ``random`` are a uniform
  sample of the run, so the precision measured on them (``grounding eval --gt
  corrections`` on those images) estimates the run's precision without the bias of
  looking only where the model was unsure.

Reasons (an image can have several) and what each adds to its priority:

- ``low_score``: the lowest box score is below :data:`LOW_SCORE`; adds ``1 - min score``.
- ``verify_disagrees``: some box's ``attributes["verify_score"]`` (``--verify``) differs
  from its box score (an unscored box counts as 1.0) by :data:`VERIFY_GAP` or more; adds
  the largest difference.
- ``truncated``: the answer (or one of its requests) hit the token limit; adds 1.
- ``repetition``: the answer degenerated into repeats; adds 1.
- ``unmatched_label``: a box or point whose label matched no class (``class_id`` null in a
  run with a class list); adds 0.5.
- ``no_objects``: the model found nothing in the image; adds 0.5.
- ``random``: drawn for the random share; adds nothing.

Records with an error or without a size are not reviewable (nothing to show a person in
the image's frame) and never chosen. Ties are broken by image key, and random draws use
``random.Random(seed)`` over the keys in sorted order, so the same records, budget,
strategy and seed give the same selection whatever the record order.

The second half talks to a Label Studio server through its official SDK
(``label-studio-sdk``, the ``review`` extra; imported only when used): :func:`push_review`
creates the project and imports the review folder's tasks with their predictions,
:func:`pull_review` fetches the tasks and their annotations back as a Label Studio JSON
export that :mod:`grounding.runs.corrections` imports. :func:`connect` turns the SDK's
failures (server unreachable, key refused, unknown project) into one-line
:class:`ReviewError`s.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grounding.core.errors import GroundingError

STRATEGIES = ("uncertain", "random", "mixed")
LOW_SCORE = 0.5
"""A box scored below this makes its image ``low_score``."""
VERIFY_GAP = 0.3
"""|verify_score - box score| at least this makes the image ``verify_disagrees``."""
RANDOM_SHARE = 0.2
"""The share of the budget ``mixed`` draws at random."""
WEIGHTS = {"truncated": 1.0, "repetition": 1.0, "unmatched_label": 0.5, "no_objects": 0.5}
REASONS = ("low_score", "verify_disagrees", "truncated", "repetition", "unmatched_label",
           "no_objects", "random")


@dataclass
class Choice:
    """One image chosen for review: why, and how urgently (higher first)."""

    image: str
    reasons: list[str] = field(default_factory=list)
    priority: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reviewable(record: dict[str, Any]) -> bool:
    """A record a person can check: no error, a size, an image key."""
    return (not record.get("error") and isinstance(record.get("image"), str)
            and record.get("width") is not None and record.get("height") is not None)


def assess(record: dict[str, Any]) -> Choice:
    """The reasons to doubt one record and its priority (see the module docstring)."""
    reasons: list[str] = []
    priority = 0.0
    boxes = [d for d in record.get("detections") or [] if isinstance(d, dict)]
    points = [p for p in record.get("points") or [] if isinstance(p, dict)]
    scores = [float(d["score"]) for d in boxes if _number(d.get("score"))]
    if scores and min(scores) < LOW_SCORE:
        reasons.append("low_score")
        priority += 1.0 - min(scores)
    gaps = []
    for d in boxes:
        verify = (d.get("attributes") or {}).get("verify_score")
        if _number(verify):
            score = float(d["score"]) if _number(d.get("score")) else 1.0
            gaps.append(abs(float(verify) - score))
    if gaps and max(gaps) >= VERIFY_GAP:
        reasons.append("verify_disagrees")
        priority += max(gaps)
    requests = [r for r in record.get("requests") or [] if isinstance(r, dict)]
    for flag in ("truncated", "repetition"):
        if record.get(flag) or any(r.get(flag) for r in requests):
            reasons.append(flag)
            priority += WEIGHTS[flag]
    uses_classes = record.get("classes") is not None or any(
        o.get("class_id") is not None for o in (*boxes, *points))
    if uses_classes and any(o.get("class_id") is None for o in (*boxes, *points)):
        reasons.append("unmatched_label")
        priority += WEIGHTS["unmatched_label"]
    if not boxes and not points:
        reasons.append("no_objects")
        priority += WEIGHTS["no_objects"]
    return Choice(str(record.get("image")), reasons, round(priority, 6))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def random_count(budget: int) -> int:
    """How many of a ``mixed`` budget are drawn at random."""
    if budget < 2:
        return 0
    return max(1, round(budget * RANDOM_SHARE))


def select_for_review(records: Iterable[dict[str, Any]], budget: int,
                      strategy: str = "uncertain", seed: int = 0, *,
                      exclude: Iterable[str] = ()) -> list[Choice]:
    """At most ``budget`` images of ``records`` for a person to check, most urgent first
    (the random share of ``mixed`` after the ranked ones); see the module docstring.
    ``exclude``: image keys not to choose (already reviewed). A repeated image counts
    once (its last record)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    skip = set(exclude)
    assessed: dict[str, Choice] = {}
    for record in records:
        if reviewable(record) and record["image"] not in skip:
            assessed[record["image"]] = assess(record)
    keys = sorted(assessed)
    rng = random.Random(seed)
    drawn: list[str] = []
    if strategy in ("random", "mixed"):
        n = budget if strategy == "random" else random_count(budget)
        drawn = rng.sample(keys, min(n, len(keys)))
    chosen = set(drawn)
    ranked: list[Choice] = []
    if strategy != "random":
        flagged = [assessed[k] for k in keys if assessed[k].reasons and k not in chosen]
        flagged.sort(key=lambda c: (-c.priority, c.image))
        ranked = flagged[:budget - len(drawn)]
    randoms = [Choice(k, [*assessed[k].reasons, "random"], assessed[k].priority)
               for k in drawn]
    return ranked + randoms


def write_selection(out: Path, choices: list[Choice], *, run_dir: Path, strategy: str,
                    budget: int, seed: int, fmt: str, considered: int) -> None:
    """``out/selection.jsonl`` (one line per chosen image: image, reasons, priority,
    strategy) and ``out/review.json`` (what was asked, and when)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "selection.jsonl").open("w", encoding="utf-8") as f:
        for c in choices:
            f.write(json.dumps({**c.to_dict(), "strategy": strategy}, ensure_ascii=False)
                    + "\n")
    info = {"run_dir": str(Path(run_dir).resolve()), "strategy": strategy, "budget": budget,
            "seed": seed, "format": fmt, "selected": len(choices), "considered": considered,
            "random_share": RANDOM_SHARE if strategy == "mixed" else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "review.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")


def read_selection(out: Path) -> list[dict[str, Any]]:
    """The lines of ``out/selection.jsonl``."""
    path = Path(out) / "selection.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- Label Studio server: push the review project, pull the annotations --------------------

PUSH_FILE = "push.json"
PULL_FILE = "labelstudio-export.json"
IMPORT_CHUNK = 500
"""Tasks per import request."""


class ReviewError(GroundingError):
    """A review step that cannot go on: one line saying why."""


def review_dir(path: Path | str) -> Path:
    """The review folder ``path`` names: itself when it holds ``review.json``, else a
    run's default ``RUN_DIR/review``."""
    path = Path(path)
    if (path / "review.json").is_file():
        return path
    if (path / "review" / "review.json").is_file():
        return path / "review"
    if not path.exists():
        raise ReviewError(f"{path}: no such folder")
    raise ReviewError(f"{path} holds no review (no review.json, nor review/review.json): "
                      "run grounding review RUN_DIR first, or give the --out folder it wrote")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReviewError(f"{path}: no such file") from None
    except ValueError as exc:
        raise ReviewError(f"{path}: not valid JSON: {exc}") from None


@contextlib.contextmanager
def connect(url: str, api_key: str, timeout: float = 60.0) -> Iterator[Any]:
    """A ``label_studio_sdk.LabelStudio`` client for ``url`` (closed afterwards); SDK and
    HTTP failures inside the block become one-line :class:`ReviewError`s."""
    try:
        import httpx
        from label_studio_sdk import LabelStudio
        from label_studio_sdk.core.api_error import ApiError
    except ImportError:
        raise ReviewError("the Label Studio SDK is not installed: pip install "
                          "'grounding[review]' (or pip install label-studio-sdk)") from None
    base = url.rstrip("/")
    with httpx.Client(timeout=timeout, follow_redirects=True) as http:
        client = LabelStudio(base_url=base, api_key=api_key, httpx_client=http)
        try:
            yield client
        except ApiError as exc:
            status = exc.status_code
            body = exc.body if isinstance(exc.body, str | dict) else ""
            detail = (body.get("detail") or body) if isinstance(body, dict) else body
            detail = " ".join(str(detail).split())[:200]
            if status == 401:
                raise ReviewError(f"Label Studio at {base} refused the API key (401: "
                                  f"{detail or 'unauthorized'})") from None
            if status == 404:
                raise ReviewError(f"Label Studio at {base}: not found (404: {detail}); is "
                                  "the project id right?") from None
            raise ReviewError(f"Label Studio at {base} answered {status}: {detail}") from None
        except httpx.HTTPError as exc:
            raise ReviewError(f"cannot reach Label Studio at {base}: "
                              f"{type(exc).__name__}: {exc}") from None


def push_review(folder: Path, client: Any, url: str, *, title: str,
                force: bool = False) -> dict[str, Any]:
    """Create a Label Studio project titled ``title`` with ``folder``'s label config,
    import its tasks with their predictions, and record ``push.json`` (project id and
    URL). Refuses a folder already pushed unless ``force``."""
    info = read_json(folder / "review.json")
    if info.get("format") != "labelstudio":
        raise ReviewError(f"{folder} was written for {info.get('format')}, not Label "
                          "Studio: run grounding review again with --format labelstudio")
    if len(title.strip()) < 3:
        raise ReviewError(f"project title {title!r}: Label Studio wants at least 3 "
                          "characters")
    pushed = folder / PUSH_FILE
    if pushed.exists() and not force:
        old = read_json(pushed)
        raise ReviewError(f"{folder} was already pushed ({old.get('project_url')}); pull "
                          "it, or pass --force to create another project")
    tasks = read_json(folder / "tasks.json")
    if not tasks:
        raise ReviewError(f"{folder}/tasks.json holds no task: nothing to review")
    config = (folder / "label_config.xml").read_text(encoding="utf-8")
    project = client.projects.create(title=title.strip(), label_config=config)
    for start in range(0, len(tasks), IMPORT_CHUNK):
        client.projects.import_tasks(id=project.id, request=tasks[start:start + IMPORT_CHUNK])
    base = url.rstrip("/")
    record = {"url": base, "project_id": project.id, "project_title": title.strip(),
              "project_url": f"{base}/projects/{project.id}", "tasks": len(tasks),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    pushed.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    return record


def find_project(client: Any, project: str) -> int:
    """A project id from ``project``: a number, or a title (exactly one project has it)."""
    if project.isdigit():
        return int(project)
    found = [p.id for p in client.projects.list(title=project) if p.title == project]
    if not found:
        raise ReviewError(f"Label Studio has no project titled {project!r}")
    if len(found) > 1:
        raise ReviewError(f"{len(found)} Label Studio projects are titled {project!r} "
                          f"(ids {', '.join(map(str, found))}): give --project ID")
    return found[0]


def pull_review(folder: Path, client: Any, project_id: int) -> tuple[Path, int, int]:
    """Fetch the project's tasks and their annotations into ``folder/`` :data:`PULL_FILE`
    (a Label Studio JSON export: ``[{"id", "data", "annotations": [...]}]``); returns
    the file, the number of tasks and of tasks with an annotation."""
    client.projects.get(id=project_id)  # 404 for an unknown project
    tasks = []
    annotated = 0
    for task in client.tasks.list(project=project_id):
        annotations = [_plain(a) for a in client.annotations.list(id=task.id)]
        annotated += any(not a.get("was_cancelled") for a in annotations)
        tasks.append({"id": task.id, "data": dict(task.data or {}),
                      "annotations": annotations})
    path = folder / PULL_FILE
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(tasks, indent=1, ensure_ascii=False, default=str) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path, len(tasks), annotated


def _plain(obj: Any) -> dict[str, Any]:
    """An SDK (pydantic) object as JSON-ready data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return dict(obj)
