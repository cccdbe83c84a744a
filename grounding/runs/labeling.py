"""Label a folder of images into a run directory: streaming, resumable, shardable."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grounding._version import __version__
from grounding.backends.options import label_settings
from grounding.core.errors import GroundingError
from grounding.io.records import JsonlWriter, read_jsonl
from grounding.pipeline.detector import Detector, Query
from grounding.runs.reach import ReachWatch
from grounding.runs.rundir import RunDir, describe_extensions, find_images, in_shard


@dataclass
class Progress:
    """What a session has done so far, handed to the progress callback."""

    total: int = 0
    done: int = 0
    objects: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


def run_config(detector: Detector, query: Query, images_dir: Path, shard: tuple[int, int],
               ontology: dict[str, str] | None = None) -> dict[str, Any]:
    """The configuration recorded in run.json; the keys in runs.CONFIG_KEYS must match on
    resume. The backend's settings are those marked ``labels`` in grounding.backends.options
    (in the order run.json has always had: model and dialect first, the rest after
    references)."""
    backend = detector.backend
    settings = label_settings(backend)
    return {
        "images_dir": str(images_dir.resolve()),
        "backend": type(backend).__name__,
        "model": settings.pop("model"),
        "dialect": settings.pop("dialect"),
        "prompt": query.recorded_prompt(backend.dialect),
        "classes": query.classes.names if query.classes is not None else None,
        "ontology": ontology,
        "task": query.task,
        "system": query.system,
        "references": _references(query),
        **settings,  # min_pixels, max_pixels, max_new_tokens, any setting marked later
        "shard": f"{shard[0]}/{shard[1]}",
        "min_score": detector.min_score,
        "verify": bool(detector.verify),
        "verify_threshold": detector.verify_threshold if detector.verify else None,
        "per_class": query.asks_per_class(backend.dialect),
        "tiles": None if query.tiling is None else query.tiling.spec,
        "tile_overlap": None if query.tiling is None else query.tiling.overlap,
        "tiles_with_full": bool(query.tiling and query.tiling.with_full),
        "dedup_iou": detector.dedup_iou,
        "dedup_agnostic": bool(detector.dedup_agnostic) if detector.dedup_iou is not None
        else False,
        "keys": None if query.keys is None else query.keys.to_dict(),
        "masks": None if detector.masks is None else detector.masks.model,
        "grounding_version": __version__,
    }


def _references(query: Query) -> list[str] | None:
    """Each reference image by name and pixels: another example changes the labels."""
    if not query.references:
        return None
    return [f"{name} sha1:{hashlib.sha1(image.tobytes()).hexdigest()[:12]}"
            for name, image in zip(query.reference_names, query.references, strict=True)]


class NoImagesError(GroundingError):
    """The images folder holds no image (or does not exist)."""


def pending_images(images_dir: Path, shard: tuple[int, int], skip: set[str],
                   exclude: Iterable[str | Path] = ()) -> Iterator[str]:
    for relative in find_images(images_dir, exclude):
        if in_shard(relative, *shard) and relative not in skip:
            yield relative


def check_images_dir(images_dir: Path, exclude: Iterable[str | Path] = ()) -> None:
    """Raise NoImagesError, with one line naming the folder (and what was looked for),
    when ``images_dir`` is not a folder or holds no image; grounding's own output in it
    (``exclude``: the run directory; see find_images) does not count."""
    images_dir = Path(images_dir)
    if not images_dir.exists():
        raise NoImagesError(f"{images_dir}: no such folder")
    if not images_dir.is_dir():
        raise NoImagesError(f"{images_dir} is not a folder")
    if next(find_images(images_dir, exclude), None) is None:
        raise NoImagesError(f"no images in {images_dir}: looked for {describe_extensions()}")


def label(
    detector: Detector,
    query: Query,
    images_dir: Path,
    run: RunDir,
    *,
    shard: tuple[int, int] = (0, 1),
    retry_errors: bool = False,
    force: bool = False,
    ontology: dict[str, str] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Label every image of ``images_dir`` (this shard) not yet in the run; return the
    summary (also written to summary.json). Ctrl-C stops cleanly: every finished image is
    on disk, and running again goes on from there.

    Raises NoImagesError when the folder holds no image (nothing is created),
    RunConfigError when the run was made with another configuration, and
    ServerUnreachable when the first requests could not connect to the server at all
    (grounding.runs.reach: nothing is recorded; run again when the server is up). Failed
    images are appended to errors.history.jsonl as they come; errors.jsonl is rewritten at
    the end of the session as the images failing now. ``on_progress`` is first called
    once the run has started (its configuration accepted, its images counted)."""
    images_dir = Path(images_dir)
    check_images_dir(images_dir, [run.path])
    run.start(run_config(detector, query, images_dir, shard, ontology), force=force)
    done = run.done()
    skip = done if retry_errors else done | run.failed(done)
    exclude = [run.path]
    progress = Progress(total=sum(1 for _ in pending_images(images_dir, shard, skip, exclude)))
    if on_progress:
        on_progress(progress)
    order: deque[str] = deque()

    def paths() -> Iterator[str]:
        for relative in pending_images(images_dir, shard, skip, exclude):
            order.append(relative)
            yield str(images_dir / relative)

    watch = ReachWatch(detector.backend)
    results = watch.guard(watch.watching(detector).detect_query(paths(), query))
    predictions = JsonlWriter(run.predictions)
    errors = JsonlWriter(run.errors_history)
    interrupted = False
    try:
        for result in results:
            relative = order.popleft()
            result.image = relative
            if result.error:
                errors.write({"image": relative, "error": result.error,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                progress.errors += 1
            else:
                predictions.write(result.to_record())
                progress.objects += len(result.boxes) + len(result.points)
            progress.done += 1
            if on_progress:
                on_progress(progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        results.close()
        predictions.close()
        errors.close()
        run.write_errors()
    summary = summarize(run)
    summary["session"] = {"labelled": progress.done, "errors": progress.errors,
                          "seconds": round(time.monotonic() - progress.started, 3),
                          "images_per_second": round(progress.rate, 3),
                          "interrupted": interrupted}
    run.summary_json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    if interrupted:
        raise KeyboardInterrupt
    return summary


def summarize(run: RunDir) -> dict[str, Any]:
    """Counts over the whole run (every session), read back from its files."""
    config = run.config()
    classes = config.get("classes") or []
    per_class: Counter[str] = Counter()
    unmatched: Counter[str] = Counter()
    objects = truncated = repeating = 0
    dropped: Counter[str] = Counter()
    done: set[str] = set()
    for record in read_jsonl(run.predictions):
        done.add(record.get("image"))
        truncated += bool(record.get("truncated"))
        repeating += bool(record.get("repetition"))
        dropped.update(record.get("dropped") or {})
        for obj in (record.get("detections") or []) + (record.get("points") or []):
            objects += 1
            cid = obj.get("class_id")
            if cid is not None and 0 <= cid < len(classes):
                per_class[classes[cid]] += 1
            else:
                unmatched[str(obj.get("label"))] += 1
    failed = run.failures(done)  # one read of predictions.jsonl serves both
    return {
        "images": len(done),
        "objects": objects,
        "objects_per_class": {c: per_class.get(c, 0) for c in classes},
        "unmatched_labels": dict(unmatched.most_common()),
        "truncated_outputs": truncated,
        "repeating_outputs": repeating,
        "dropped": dict(sorted(dropped.items())),
        "errors": len(failed),
    }
