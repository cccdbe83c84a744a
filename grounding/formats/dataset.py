"""A detection dataset read back from disk: what ``load_coco`` and ``load_yolo`` return.

Each format keeps its reader next to its exporter (``formats/coco.py``,
``formats/yolo.py``); this module holds what they share: the returned structure, the error
for a file that cannot be used at all, and the checks on single values.

A reader never stops at one bad entry: an annotation, image entry or label line that is
malformed is left out, counted in :attr:`Dataset.skipped`, and the first
:data:`MAX_WARNINGS` are described in :attr:`Dataset.warnings` as
``"FILE: WHERE: REASON"`` (WHERE an ``annotations[3] (id 17)`` or a line number), so a
caller can say what was skipped and why. A file that is unusable as a whole (not JSON, a
JSON list where a COCO object belongs, no ``data.yaml``) raises :class:`DatasetError`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from grounding.core.errors import GroundingError

MAX_WARNINGS = 1000
"""At most this many skipped entries are described in ``Dataset.warnings``; all are counted."""


class DatasetError(GroundingError, ValueError):
    """A dataset file that cannot be read at all; the message names the file and the cause."""


class DatasetBox(NamedTuple):
    """One ground-truth box, in pixels of the displayed image (EXIF orientation applied)."""

    category_id: int
    """The dataset's own id, a key of :attr:`Dataset.names`: COCO's ``category_id``, YOLO's
    class index."""
    x1: float
    y1: float
    x2: float
    y2: float
    iscrowd: bool = False
    """COCO's crowd region (matches nothing, and a box on it is not a false positive)."""
    segmentation: Any = None
    """COCO's ``segmentation`` as the file has it (polygons, or RLE with ``counts`` a list
    or a string) when it is one of those shapes, else None; YOLO's reader leaves it None.
    Only ``evaluate(..., iou_type="segm")`` reads it."""


@dataclass
class DatasetImage:
    path: str
    """POSIX path: COCO's ``file_name`` (relative to ``images_root`` when it is absolute and
    under it), or a YOLO image's path under ``images/`` (``train/a.jpg``)."""
    width: int
    height: int
    boxes: list[DatasetBox] = field(default_factory=list)


@dataclass
class Dataset:
    """Images with their sizes and boxes (pixel xyxy), and the class names by id."""

    source: str
    """The COCO file or YOLO directory read."""
    names: dict[int, str]
    """Category id -> name (COCO ``categories``, YOLO ``data.yaml`` ``names``)."""
    images: list[DatasetImage] = field(default_factory=list)
    skipped: int = 0
    """Entries left out as malformed: annotations, image entries, categories, label lines,
    unreadable images or label files."""
    warnings: list[str] = field(default_factory=list)
    """``"FILE: WHERE: REASON"`` for the first MAX_WARNINGS entries left out."""

    def skip(self, where: str, reason: str) -> None:
        """Count one entry left out and, while there is room, say which and why."""
        self.skipped += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"{where}: {reason}")


def relative_path(path: str, root: Path | None) -> str:
    """``path`` as POSIX; an absolute one under ``root`` made relative to it."""
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() and root is not None:
        with contextlib.suppress(ValueError):
            p = PurePosixPath(Path(str(p)).resolve().relative_to(root.resolve()).as_posix())
    return p.as_posix()


def as_int(value: Any) -> int | None:
    """A whole number (an int, or a float with no fraction), else None; bools are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def as_number(value: Any) -> float | None:
    """A finite int or float as float, else None; bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def show(value: Any, limit: int = 60) -> str:
    """A value as it is quoted in a warning: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
