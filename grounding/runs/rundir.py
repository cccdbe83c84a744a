"""A labelling run directory: append-only JSON lines that survive crashes and resume.

    RUN_DIR/run.json           the exact configuration (refused if it changes, see --force)
    RUN_DIR/predictions.jsonl  one record per labelled image, appended and flushed
    RUN_DIR/errors.jsonl       one line per image failing now (its latest error and how
                               many times it failed), rewritten at the end of every session
    RUN_DIR/errors.history.jsonl  every failure of every session, appended and flushed
    RUN_DIR/summary.json       counts, rewritten at the end of every session

An image is done when its record is in predictions.jsonl; it is failing when its last
word in errors.history.jsonl is an error and it is not done (a retry that fixed it takes
it out of errors.jsonl). A crash or ``kill -9`` can only leave a half-written last line,
which is cut off on the next start, so that image is simply labelled again: nothing is
lost and nothing is written twice.

Nothing grounding writes is ever an input: :func:`find_images` skips the run directory
being written, any other run directory and any exported dataset under the images folder.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from grounding.backends.options import LABEL_KEYS, LABEL_MISSING
from grounding.core.errors import GroundingError
from grounding.io.images import IMAGE_EXTENSIONS
from grounding.io.records import read_jsonl, repair_jsonl

RUN_KEYS = ("images_dir", "backend", "prompt", "classes", "ontology", "task", "system",
            "shard", "min_score", "verify", "verify_threshold", "references", "per_class",
            "tiles", "tile_overlap", "tiles_with_full", "dedup_iou", "dedup_agnostic", "keys",
            "masks")
"""What the run and its query decide (the images, which backend, what is asked, which
share, what is kept); the backend's own settings are LABEL_KEYS."""

# What must not change between sessions of one run: these decide what the labels mean.
CONFIG_KEYS = (*RUN_KEYS[:2], *LABEL_KEYS, *RUN_KEYS[2:])
CONFIG_DEFAULTS = {"verify": False, "references": None, "per_class": False, "tiles": None,
                   "tile_overlap": None, "tiles_with_full": False, "dedup_iou": None,
                   "dedup_agnostic": False, "keys": None, "masks": None,
                   **LABEL_MISSING}
"""What a key added to CONFIG_KEYS later means in a run.json written before it existed,
so older runs still resume (a backend setting's comes from its ``missing`` metadata)."""


class RunConfigError(GroundingError):
    """The run directory was made with another configuration."""


EXPORT_MARKERS = {"annotations.json": b"exported by grounding",
                  "data.yaml": b"# written by grounding"}
"""An exported dataset, by a file at its top and what the exporter writes at that file's
start (grounding.formats: the COCO ``info`` and the YOLO ``data.yaml`` comment). Label
Studio exports hold no images, so they need no marker."""


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a grounding run (a run.json that grounding wrote)."""
    try:
        with open(path / "run.json", "rb") as f:
            config = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "grounding_version" in config


def is_export_dir(path: Path) -> bool:
    """Whether ``path`` is a dataset grounding exported (COCO or YOLO)."""
    for name, marker in EXPORT_MARKERS.items():
        try:
            with open(path / name, "rb") as f:
                if marker in f.read(256):
                    return True
        except OSError:
            continue
    return False


def find_images(root: Path, exclude: Iterable[str | Path] = ()) -> Iterator[str]:
    """Image paths under ``root`` (recursive, extensions case-insensitive), relative and
    POSIX-style, in a stable order (sorted directory walk).

    What grounding wrote is never an input: below ``root``, the directories in
    ``exclude`` (the run being written), every other run directory (:func:`is_run_dir`)
    and every exported dataset (:func:`is_export_dir`) are skipped with all they hold,
    so a run directory or an export inside the images folder is not labelled again."""
    root = Path(root)
    skip = {os.path.realpath(p) for p in exclude}

    def output(path: Path) -> bool:
        return os.path.realpath(path) in skip or is_run_dir(path) or is_export_dir(path)

    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        dirs[:] = [d for d in sorted(dirs) if not output(here / d)]
        base = here.relative_to(root)
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield (base / name).as_posix()


def describe_extensions() -> str:
    """The image extensions find_images looks for, as a person reads them."""
    return ", ".join(sorted(IMAGE_EXTENSIONS)) + " files, any case, in subfolders too"


def in_shard(relative: str, index: int, count: int) -> bool:
    """Deterministic 1/count of the images, by a hash of the path: stable when images are
    added and the same on every machine."""
    return count <= 1 or zlib.crc32(relative.encode("utf-8")) % count == index


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N, e.g. 0/4; got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return index, count


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.predictions = self.path / "predictions.jsonl"
        self.errors = self.path / "errors.jsonl"
        self.errors_history = self.path / "errors.history.jsonl"
        self.run_json = self.path / "run.json"
        self.summary_json = self.path / "summary.json"

    def config(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GroundingError(f"{self.path} is not a grounding run (no run.json)") from None
        except ValueError as exc:
            raise GroundingError(f"{self.run_json} is not valid JSON: {exc}") from None

    def start(self, config: dict[str, Any], *, force: bool = False) -> None:
        """Create the run, or check that ``config`` matches the one it was made with.

        With ``force`` a changed configuration starts the run over: the old files are
        kept beside the new ones under a timestamped name, never deleted."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.run_json.exists():
            old = self.config()
            before = {k: old.get(k, CONFIG_DEFAULTS.get(k)) for k in CONFIG_KEYS}
            changed = [k for k in CONFIG_KEYS if before[k] != config.get(k)]
            if changed and self.empty():  # refused or stopped before any image: not a run yet
                changed = []
            if changed and not force:
                details = "; ".join(f"{k}: {before[k]!r} -> {config.get(k)!r}" for k in changed)
                older = [k for k in changed if k not in old]
                hint = (f" ({', '.join(older)}: this run is from a grounding without them; "
                        "--no-dedup --stop-repeats 0 give what it had)" if older else "")
                raise RunConfigError(
                    f"{self.path} was labelled with another configuration ({details}). Run "
                    f"with the settings in its run.json to go on{hint}, use a new --out "
                    "directory, or --force to start this one over (the old predictions are "
                    "kept as predictions.<time>.jsonl)."
                )
            if changed:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                for f in (self.predictions, self.errors, self.errors_history, self.run_json,
                          self.summary_json):
                    if f.exists():
                        f.rename(f.with_name(f"{f.stem}.{stamp}{f.suffix}"))
        for f in (self.predictions, self.errors, self.errors_history):
            repair_jsonl(f)
        if self.errors.exists() and not self.errors_history.exists():
            # A run from before errors.history.jsonl: its errors.jsonl was the history.
            tmp = self.errors_history.with_suffix(".jsonl.tmp")
            tmp.write_bytes(self.errors.read_bytes())
            os.replace(tmp, self.errors_history)
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.run_json)

    def empty(self) -> bool:
        """Whether no image was recorded yet (no prediction, no error): a run refused or
        stopped before its first image, whose configuration binds nothing."""
        return not any(f.exists() and f.stat().st_size > 0
                       for f in (self.predictions, self.errors_history, self.errors))

    def done(self) -> set[str]:
        return {r["image"] for r in read_jsonl(self.predictions) if "image" in r}

    def failures(self, done: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """Each image failing now (its last word is an error and it has no record; an
        error fixed by a later retry is not), in the order of their latest failure, with
        that failure's error and time and how many times it failed."""
        done = self.done() if done is None else done
        history = self.errors_history if self.errors_history.exists() else self.errors
        latest: dict[str, dict[str, Any]] = {}
        for r in read_jsonl(history):
            image = r.get("image")
            if image is None or image in done:
                continue
            attempts = latest.pop(image, {}).get("attempts", 0) + r.get("attempts", 1)
            latest[image] = {"image": image, "error": r.get("error"), "time": r.get("time"),
                             "attempts": attempts}
        return latest

    def failed(self, done: set[str] | None = None) -> set[str]:
        """Images failing now (see :meth:`failures`)."""
        return set(self.failures(done))

    def write_errors(self, done: set[str] | None = None) -> int:
        """Rewrite errors.jsonl (atomically) as the images failing now, one line each;
        returns how many."""
        failures = self.failures(done)
        tmp = self.errors.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for entry in failures.values():
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(tmp, self.errors)
        return len(failures)

    def records(self) -> Iterator[dict[str, Any]]:
        return read_jsonl(self.predictions)
