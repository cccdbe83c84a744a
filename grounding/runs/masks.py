"""Masks for a run that has boxes: a new run keeping every record's boxes, each box
segmented, without asking the detector again (``grounding masks RUN_DIR --out NEW``).

The new run is a run like any other (run.json, predictions.jsonl, errors.jsonl,
summary.json): its run.json is the old one with ``masks`` set to the segmenter's model
and ``source_run`` naming where the boxes came from, so export and eval read it, and a
second ``grounding masks`` into it resumes (only records not yet there are segmented).
An image that cannot be read again, or that the segmenter fails on, is an error of the
new run; the others go on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grounding.core.errors import GroundingError
from grounding.core.result import Result
from grounding.io import storage
from grounding.io.images import load_image
from grounding.io.records import JsonlWriter
from grounding.pipeline.masks import Segmenter, with_masks
from grounding.runs.labeling import summarize
from grounding.runs.rundir import RunDir
from grounding.runs.sources import image_base


def add_masks(source: RunDir | str | Path, out: RunDir | str | Path, segmenter: Segmenter,
              *, batch_size: int = 4, force: bool = False,
              on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Segment every box of ``source`` into the run ``out``; return its summary.
    GroundingError (one line) when ``source`` is not a run, ``out`` is ``source``, or
    ``out`` was made from another run or with another segmenter (``force`` starts it
    over, keeping the old files renamed, as ``label --force`` does)."""
    source = source if isinstance(source, RunDir) else RunDir(source)
    out = out if isinstance(out, RunDir) else RunDir(out)
    config = source.config()
    if out.path.resolve() == source.path.resolve():
        raise GroundingError(f"--out {out.path} is the run the boxes come from; masks go "
                             "into a new run directory")
    if config.get("masks"):
        raise GroundingError(f"{source.path} already has masks ({config['masks']})")
    images_dir = image_base(config["images_dir"])  # a list's folder; a URI stays one
    new = dict(config, masks=segmenter.model, source_run=str(source.path.resolve()))
    new.pop("grounding_version", None)
    from grounding._version import __version__

    new["grounding_version"] = __version__
    out.start(new, force=force)
    done = out.done()
    predictions = JsonlWriter(out.predictions)
    errors = JsonlWriter(out.errors_history)
    count = 0
    try:
        for result in with_masks(_pending(source, images_dir, done), segmenter,
                                 batch_size=batch_size):
            if result.error:
                errors.write({"image": result.image, "error": result.error,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            else:
                predictions.write(result.to_record())
            count += 1
            if on_progress:
                on_progress(count)
    finally:
        predictions.close()
        errors.close()
        out.write_errors()
    summary = summarize(out)
    out.summary_json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return summary


def _pending(source: RunDir, images_dir: str, done: set[str]) -> Iterator[Result]:
    """Each record of ``source`` not yet in the new run, its image attached (upright, as
    it was labelled); an image that cannot be read is an error record."""
    for record in source.records():
        name = record.get("image")
        if name is None or name in done:
            continue
        result = Result.from_record(record)
        try:
            image = load_image(storage.join(images_dir, name))
        except GroundingError as exc:
            result.error = str(exc)
            yield result
            continue
        if result.image_size is not None and image.size != result.image_size:
            result.error = (f"{name}: the image is {image.width}x{image.height} now but was "
                            f"labelled at {result.width}x{result.height}: was it replaced?")
            yield result
            continue
        yield result.attach(image)
