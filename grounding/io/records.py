"""Record files: JSON lines appended crash-safely, read back, repaired after a kill; and
the record files a person hands grounding (one record, a list, or JSON lines)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grounding.core.errors import GroundingError


def repair_jsonl(path: Path) -> int:
    """Make the file end on a whole line. A last line without its newline is cut when it
    does not parse (the writer was killed mid-write) and kept, its newline added, when it
    is a complete record (a hand-edited file, shards joined with ``cat``).
    Returns the number of bytes removed (0 when the last line was kept)."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline in blocks.
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.seek(keep)
        if _is_record(f.read(size - keep)):
            f.seek(size)
            f.write(b"\n")
            return 0
        f.truncate(keep)
        return size - keep


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a line that is not JSON is skipped (cannot happen
    with grounding's writer, but a hand-edited file should not stop a run)."""
    if not path.exists():
        return
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def latest_lines(path: Path, key: str = "image"
                 ) -> tuple[dict[str, tuple[int, dict[str, Any]]], list[tuple[int, Any]]]:
    """A JSON-lines file whose later lines supersede earlier ones (a run's
    corrections.jsonl): the last object of each ``key`` value with its line number, in
    the order of those last lines; and the lines that are no such object, as (line
    number, the ValueError, or the value read). A missing file has neither."""
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    bad: list[tuple[int, Any]] = []
    if not Path(path).exists():
        return latest, bad
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                bad.append((number, exc))
                continue
            name = entry.get(key) if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name:
                bad.append((number, entry))
                continue
            latest.pop(name, None)
            latest[name] = (number, entry)
    return latest, bad


class JsonlWriter:
    """Appends one line per record with a single write + flush; fsync now and then."""

    def __init__(self, path: Path, fsync_every: float = 5.0) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._fsync_every = fsync_every
        self._last_sync = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if time.monotonic() - self._last_sync > self._fsync_every:
            os.fsync(self._file.fileno())
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a file: one JSON record (``grounding detect --out``), a JSON list of
    them, or JSON lines (``grounding detect`` on stdout, a label run's predictions.jsonl)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GroundingError(f"cannot read {path}: {exc}") from None
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return [whole]
    if isinstance(whole, list):
        records = [r for r in whole if isinstance(r, dict)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise GroundingError(f"{path}:{number} is not a JSON record") from None
            if isinstance(record, dict):
                records.append(record)
    if not records:
        raise GroundingError(f"{path} holds no grounding record")
    return records


def pick_record(records: list[dict[str, Any]], image: str | Path,
                source: str = "the file") -> dict[str, Any]:
    """The record whose ``image`` is ``image``: the same path (as written or resolved),
    else the one whose relative path ends ``image``'s path the furthest (label runs store
    paths relative to their folder), else the only record there is."""
    target = Path(image)
    try:
        resolved = target.resolve()
    except OSError:
        resolved = target.absolute()

    def same(name: str) -> bool:
        if name == str(image):
            return True
        try:
            return Path(name).resolve() == resolved
        except OSError:
            return False

    named = [r for r in records if isinstance(r.get("image"), str)]
    exact = [r for r in named if same(r["image"])]
    if len(exact) == 1:
        return exact[0]
    if not exact:
        depth = {id(r): len(Path(r["image"]).parts) for r in named
                 if not Path(r["image"]).is_absolute()
                 and resolved.parts[-len(Path(r["image"]).parts):] == Path(r["image"]).parts}
        if depth:
            best = max(depth.values())
            exact = [r for r in named if depth.get(id(r)) == best]
            if len(exact) == 1:
                return exact[0]
    if len(records) == 1:
        return records[0]
    if exact:
        raise GroundingError(f"{len(exact)} records in {source} are for {image}; keep one")
    raise GroundingError(f"no record in {source} is for {image} ({len(records)} records)")
