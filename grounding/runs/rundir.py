"""A labelling run directory: append-only JSON lines that survive crashes and resume.

    RUN_DIR/run.json           the exact configuration (refused if it changes, see --force)
    RUN_DIR/predictions.jsonl  one record per labelled image, appended and flushed
    RUN_DIR/errors.jsonl       one line per image that failed, with the cause
    RUN_DIR/summary.json       counts, rewritten at the end of every session

An image is done when its record is in predictions.jsonl. A crash or ``kill -9`` can
only leave a half-written last line, which is cut off on the next start, so that image is
simply labelled again: nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grounding.backends.options import LABEL_KEYS, LABEL_MISSING
from grounding.core.errors import GroundingError
from grounding.io.images import IMAGE_EXTENSIONS
from grounding.io.records import read_jsonl, repair_jsonl

RUN_KEYS = ("images_dir", "backend", "prompt", "classes", "ontology", "task", "system",
            "shard", "min_score", "verify", "verify_threshold", "references")
"""What the run and its query decide (the images, which backend, what is asked, which
share, what is kept); the backend's own settings are LABEL_KEYS."""

# What must not change between sessions of one run: these decide what the labels mean.
CONFIG_KEYS = (*RUN_KEYS[:2], *LABEL_KEYS, *RUN_KEYS[2:])
CONFIG_DEFAULTS = {"verify": False, "references": None, **LABEL_MISSING}
"""What a key added to CONFIG_KEYS later means in a run.json written before it existed,
so older runs still resume (a backend setting's comes from its ``missing`` metadata)."""


class RunConfigError(GroundingError):
    """The run directory was made with another configuration."""


def find_images(root: Path) -> Iterator[str]:
    """Image paths under ``root`` (recursive, extensions case-insensitive), relative and
    POSIX-style, in a stable order (sorted directory walk)."""
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(directory).relative_to(root)
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield (base / name).as_posix()


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
            if changed and not force:
                details = "; ".join(f"{k}: {before[k]!r} -> {config.get(k)!r}" for k in changed)
                raise RunConfigError(
                    f"{self.path} was labelled with another configuration ({details}). Use a "
                    "new --out directory, or --force to start this one over (the old "
                    "predictions are kept as predictions.<time>.jsonl)."
                )
            if changed:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                for f in (self.predictions, self.errors, self.run_json, self.summary_json):
                    if f.exists():
                        f.rename(f.with_name(f"{f.stem}.{stamp}{f.suffix}"))
        for f in (self.predictions, self.errors):
            repair_jsonl(f)
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.run_json)

    def done(self) -> set[str]:
        return {r["image"] for r in read_jsonl(self.predictions) if "image" in r}

    def failed(self, done: set[str] | None = None) -> set[str]:
        """Images whose last word is an error (an error fixed by a later retry is not)."""
        done = self.done() if done is None else done
        return {r["image"] for r in read_jsonl(self.errors) if "image" in r} - done

    def records(self) -> Iterator[dict[str, Any]]:
        return read_jsonl(self.predictions)
