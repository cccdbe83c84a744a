"""Label a set of images into a run directory: streaming, resumable, shardable, on this
machine or on a Ray cluster (the engine)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from grounding._version import __version__
from grounding.backends.options import label_settings
from grounding.io.records import JsonlWriter, read_jsonl
from grounding.pipeline.detector import Detector, Query
from grounding.runs.reach import ReachWatch, StorageWatch
from grounding.runs.rundir import RunDir, in_shard
from grounding.runs.sources import ImageSet, NoImagesError, open_images

__all__ = ["Engine", "LocalEngine", "NoImagesError", "Progress", "label", "run_config",
           "summarize"]


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


def run_config(detector: Detector, query: Query, images_dir: str | Path,
               shard: tuple[int, int], ontology: dict[str, str] | None = None) -> dict[str, Any]:
    """The configuration recorded in run.json; the keys in runs.CONFIG_KEYS must match on
    resume. The backend's settings are those marked ``labels`` in grounding.backends.options
    (in the order run.json has always had: model and dialect first, the rest after
    references)."""
    backend = detector.backend
    settings = label_settings(backend)
    return {
        "images_dir": images_dir if isinstance(images_dir, str) else str(images_dir.resolve()),
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


class Engine(Protocol):
    """Where the model runs for a label run: turns (key, location) pairs into records.

    ``records`` yields one record per item (``Result.to_record()``, its ``image`` the
    key; a failed image is a record with ``error`` set), in any order. The default,
    :class:`LocalEngine`, runs the detector in this process; ``grounding.runs.ray_engine``
    spreads the same work over a Ray cluster. The engine is not part of a run's
    configuration: a run resumes under either."""

    def records(self, detector: Detector, query: Query,
                items: list[tuple[str, str]]) -> Iterator[dict[str, Any]]: ...


class LocalEngine:
    """The detector in this process, images decoded in its I/O threads."""

    def records(self, detector: Detector, query: Query,
                items: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        order: deque[str] = deque()

        def locations() -> Iterator[str]:
            for key, location in items:
                order.append(key)
                yield location

        watch = ReachWatch(detector.backend)
        results = watch.guard(watch.watching(detector).detect_query(locations(), query))
        try:
            for result in results:
                result.image = order.popleft()
                yield result.to_record()
        finally:
            results.close()


def label(
    detector: Detector,
    query: Query,
    images: str | Path | ImageSet,
    run: RunDir,
    *,
    shard: tuple[int, int] = (0, 1),
    retry_errors: bool = False,
    force: bool = False,
    ontology: dict[str, str] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Label every image of ``images`` (this shard) not yet in the run; return the
    summary (also written to summary.json). Ctrl-C stops cleanly: every finished image is
    on disk, and running again goes on from there.

    ``images``: a folder, a list file (.txt, .jsonl, .parquet) or either on object
    storage (grounding.runs.sources). ``engine``: where the model runs (default: here,
    :class:`LocalEngine`); with another engine ``detector`` may hold a described backend
    (grounding.backends.base.BackendSpec): it plans and records the run, the engine's
    workers run the model.

    Raises NoImagesError when there is no image (nothing is created), RunConfigError
    when the run was made with another configuration, and ServerUnreachable when the
    first requests could not connect to the server at all (grounding.runs.reach: nothing
    is recorded; run again when the server is up), StorageUnreachable when the first
    images could not reach their storage at all (the same rule). Failed images are appended to
    errors.history.jsonl as they come; errors.jsonl is rewritten at the end of the
    session as the images failing now. ``on_progress`` is first called once the run has
    started (its configuration accepted, its images counted)."""
    image_set = images if isinstance(images, ImageSet) else open_images(images, [run.path])
    keys = list(image_set.keys())
    if not keys:
        raise NoImagesError(f"no images in {image_set.root}")
    run.start(run_config(detector, query, image_set.root, shard, ontology), force=force)
    done = run.done()
    skip = done if retry_errors else done | run.failed(done)
    pending = [(key, image_set.location(key)) for key in keys
               if in_shard(key, *shard) and key not in skip]
    del keys
    progress = Progress(total=len(pending))
    if on_progress:
        on_progress(progress)
    records = (engine or LocalEngine()).records(detector, query, pending) if pending \
        else iter(())
    predictions = JsonlWriter(run.predictions)
    errors = JsonlWriter(run.errors_history)
    written: set[str] = set()
    storage = StorageWatch()
    interrupted = False

    def decided() -> Iterator[dict[str, Any]]:
        for record in records:
            yield from storage.see(record)
        storage.finish()

    try:
        for record in decided():
            key = record["image"]
            if key in written:  # an engine that retried a batch it had delivered
                continue
            written.add(key)
            if record.get("error"):
                errors.write({"image": key, "error": record["error"],
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                progress.errors += 1
            else:
                predictions.write(record)
                progress.objects += len(record.get("detections") or []) + len(
                    record.get("points") or [])
            progress.done += 1
            if on_progress:
                on_progress(progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()
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
