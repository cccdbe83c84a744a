"""What every exporter shares: which records, boxes and points go out, and where images go.

Exporters stream: they take records one at a time and keep nothing per image, so memory
stays flat however many images a run labelled. The only per-image state is on disk; an
export directory must therefore start empty (``overwrite=True`` clears a previous one),
and then a target file that already exists means two records claim the same output name
(a duplicate record, or two images that flatten to one name), which is skipped and
reported instead of silently overwriting an image with another's labels.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, ImageOps

from grounding.core.errors import StorageError
from grounding.core.result import Box, Point, Result, score_at_least
from grounding.io import storage
from grounding.io.images import open_header

EXIF_ORIENTATION = 0x0112
MAX_LISTED = 1000
"""At most this many skipped images are named in ``ExportStats.skipped``; all are counted."""


@dataclass
class ExportStats:
    """What an export wrote and what it left out, and why."""

    images: int = 0
    boxes: int = 0
    boxes_below_min_score: int = 0
    boxes_without_class: int = 0
    """Boxes whose label matched no class (``class_id`` null): no category to file them."""
    points: int = 0
    points_below_min_score: int = 0
    points_without_class: int = 0
    points_not_supported: int = 0
    """Points the format cannot hold (YOLO detection labels)."""
    records_with_error: int = 0
    records_without_size: int = 0
    """Records with ``width`` null: coordinates are in the model frame, not the image's."""
    images_missing: int = 0
    images_unusable: int = 0
    """Unreadable, size differs from the record, no file named, or output name already
    taken by an earlier record."""
    upright_copies: int = 0
    """EXIF-rotated sources written as upright files instead of linked."""
    masks: int = 0
    """Boxes exported with their mask (``Box.mask``, from ``--masks``)."""
    boxes_without_mask: int = 0
    """YOLO segmentation labels: boxes with no mask, left out (a box is not an outline)."""
    masks_without_polygon: int = 0
    """Polygon output: masks with no contour of 3 or more points (empty, or one pixel
    thin); COCO writes their RLE instead, YOLO segmentation and Label Studio leave them
    out (Label Studio keeps the rectangle)."""
    skipped: list[str] = field(default_factory=list)
    """``"path: reason"`` for the first MAX_LISTED images skipped as missing or unusable."""

    def skip(self, path: str, reason: str, *, missing: bool = False) -> None:
        if missing:
            self.images_missing += 1
        else:
            self.images_unusable += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(f"{path}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Item:
    """One record whose image is on disk and agrees with it."""

    record: dict[str, Any]
    relative: str
    """Path relative to the images root, POSIX style; for an image outside it (a URI or
    an absolute path, as list inputs give) its path without scheme or anchor."""
    source: Path | str
    """Absolute: the images root resolved, then the relative path; or the image's URI
    (a ``str``: object storage)."""
    width: int
    height: int
    orientation: int
    """EXIF orientation of the source file; 1 when absent or meaningless."""
    data: bytes | None = None
    """The bytes of a ``source`` on object storage, read once for the size check and
    written out by :func:`place_image` (a URI cannot be linked)."""


def check_class_names(class_names: list[str]) -> list[str]:
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique: {names}")
    return names


class ExportExists(FileExistsError):
    """The output of an export already holds files (a previous export?) and ``overwrite``
    was not given; ``path`` is what is in the way. The message names the Python option
    (``overwrite=True``); the CLI names its own (``--overwrite``)."""

    def __init__(self, path: Path, what: str = "holds a previous export") -> None:
        self.path = path
        self.what = what
        super().__init__(f"{path} {what}; pass overwrite=True to replace it")


def images_root_of(images_root: Path | str) -> Path | str:
    """The images root as exporters keep it: a Path, or a ``str`` when it is a URI
    (``Path`` would fold its ``//``)."""
    if isinstance(images_root, str) and storage.local_path(images_root) is None:
        return images_root.rstrip("/")
    return Path(storage.local_path(images_root) or images_root)


def prepare_dir(path: Path, *, overwrite: bool, keep: Path | str) -> None:
    """Make ``path`` an empty directory; refuse to reuse a non-empty one unless
    ``overwrite`` (:class:`ExportExists`), and never delete a tree that holds ``keep``
    (the source images; a URI holds nothing here)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ExportExists(path, "is not empty (a previous export?)")
        resolved = path.resolve()
        keep = images_root_of(keep)
        source = None if isinstance(keep, str) else keep.resolve()
        if source is not None and (source == resolved or resolved in source.parents):
            raise ValueError(f"refusing to delete {path}: it contains the images root {keep}")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _relative(image: str, images_root: Path | str) -> str | None:
    """The name the record's image is exported under (see :func:`locate`), or None when
    the record names no image."""
    found = locate(image, images_root)
    return None if found is None else found[0]


def locate(image: str, images_root: Path | str) -> tuple[str, Path | str] | None:
    """The export name (POSIX, relative, never with ``..``) and the source (a resolved
    Path, or a URI ``str``) of a record's image; None when it names no file.

    An image under the root is named relative to it, as runs over a folder always were;
    one elsewhere (a URI or an absolute path, as list inputs give) by its path without
    the scheme or anchor: ``s3://bucket/a/b.jpg`` -> ``bucket/a/b.jpg``, ``/data/x.jpg``
    -> ``data/x.jpg``."""
    root = images_root_of(images_root)
    text = str(image)
    local = storage.local_path(text)
    if local is None:  # a URI
        base = root if isinstance(root, str) else None
        if base is not None and text.startswith(base + "/"):
            name = _clean(text[len(base) + 1:])
        else:
            name = _clean(text.split("://", 1)[1])
        return None if name is None else (name, text)
    if isinstance(root, str):  # a relative entry of a list on object storage
        if os.path.isabs(local):
            return _outside(Path(local).resolve())
        name = _clean(local)
        return None if name is None else (name, storage.join(root, local))
    path = PurePosixPath(local.replace("\\", "/"))
    resolved_root = _resolved(root)
    if not path.is_absolute() and ".." not in path.parts:
        if not path.parts or str(path) == ".":
            return None
        return path.as_posix(), resolved_root / path
    absolute = (resolved_root / Path(str(path))).resolve()
    try:
        return absolute.relative_to(resolved_root).as_posix(), absolute
    except ValueError:
        return _outside(absolute)


@functools.lru_cache(maxsize=16)
def _resolved(root: Path) -> Path:
    """The root resolved once per export, not once per record (a million records)."""
    return root.resolve()


def _outside(path: Path) -> tuple[str, Path] | None:
    name = path.relative_to(path.anchor).as_posix()
    return (name, path) if name and name != "." else None


def _clean(text: str) -> str | None:
    """A relative POSIX name: no query, no ``.``, no ``..`` (a ``..`` above the top is
    dropped), or None when nothing is left."""
    name = posixpath.normpath("/" + text.split("?", 1)[0]).lstrip("/")
    return name or None


def _orientation(image: Image.Image, path: Path | bytes) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        # An eXIf chunk after the pixels: Pillow's getexif() would decode the whole image
        # to reach it, so walk the chunk headers instead.
        exif = Image.Exif()
        exif.load(_png_late_exif(path))
    else:
        exif = image.getexif()
    value = exif.get(EXIF_ORIENTATION)
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _png_late_exif(path: Path | bytes) -> bytes:
    with (io.BytesIO(path) if isinstance(path, bytes) else path.open("rb")) as f:
        f.seek(8)  # signature
        while header := f.read(8):
            if len(header) < 8:
                break
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return b""


def iter_items(records: Iterable[dict[str, Any]], images_root: Path | str,
               stats: ExportStats) -> Iterator[Item]:
    """The records that can be exported, in order; the rest are counted in ``stats``.

    Each image's header is read (not its pixels) to check the displayed size against the
    record: a mismatch means the file changed or the root is wrong, and the boxes would
    land in the wrong place. ``images_root`` is where relative record names resolve (a
    folder, or a URI for a run over object storage); images elsewhere are named by
    :func:`locate`. An image on object storage is read whole, once, here.
    """
    for record in records:
        if record.get("error"):
            stats.records_with_error += 1
            continue
        if record.get("width") is None or record.get("height") is None:
            stats.records_without_size += 1
            continue
        image = record.get("image")
        found = locate(image, images_root) if image else None
        if found is None:
            stats.skip(str(image), "not a path to an image file")
            continue
        relative, source = found
        data = None
        if isinstance(source, str):
            try:
                data = storage.read_bytes(source)
            except StorageError as exc:
                stats.skip(relative, str(exc), missing=exc.missing)
                continue
        elif not source.is_file():
            stats.skip(relative, f"no such file {source}", missing=True)
            continue
        try:
            with open_header(source if data is None else data) as im:
                w, h = im.size
                orientation = _orientation(im, source if data is None else data)
        except (OSError, SyntaxError, ValueError) as exc:
            stats.skip(relative, f"unreadable ({exc})")
            continue
        if orientation >= 5:
            w, h = h, w
        width, height = int(record["width"]), int(record["height"])
        if (w, h) != (width, height):
            stats.skip(relative, f"displayed size {w}x{h} on disk, record says "
                                 f"{width}x{height}")
            continue
        yield Item(record, relative, source, width, height, orientation, data)


def _class_id(value: Any, n_classes: int, image: str) -> int | None:
    if value is None:
        return None
    class_id = int(value)
    if not 0 <= class_id < n_classes:
        raise ValueError(f"{image}: class_id {class_id} is outside the class list of "
                         f"{n_classes} names; export with the class list the run used")
    return class_id


def _has_class(obj: Box | Point) -> bool:
    return obj.class_id is not None


def _no_point(point: Point) -> bool:
    return False


def select(item: Item, n_classes: int, min_score: float | None, stats: ExportStats, *,
           points: bool = True) -> Result:
    """The item's record as a :class:`Result` holding what goes out, each removal made by
    :meth:`Result.filter` and counted in ``stats``: all points when the format holds none
    (``points=False``), then boxes and points without a class, then those scored below
    ``min_score`` (unscored ones stay, see :func:`score_at_least`). Class ids become ints
    and scores floats. Raises ValueError for a malformed box or point (not finite,
    reversed) or a class_id outside the class list."""
    result = Result.from_record(item.record)
    if not points:
        stats.points_not_supported += len(result.points)
        result = result.filter(keep_point=_no_point, reason="not_supported")
    for obj in (*result.boxes, *result.points):
        obj.class_id = _class_id(obj.class_id, n_classes, item.relative)
        obj.score = None if obj.score is None else float(obj.score)
    classed = result.filter(_has_class, _has_class, reason="without_class")
    scored = score_at_least(min_score)
    kept = classed.filter(scored, scored, reason="low_score")
    stats.boxes_without_class += len(result.boxes) - len(classed.boxes)
    stats.points_without_class += len(result.points) - len(classed.points)
    stats.boxes_below_min_score += len(classed.boxes) - len(kept.boxes)
    stats.points_below_min_score += len(classed.points) - len(kept.points)
    stats.boxes += len(kept.boxes)
    stats.points += len(kept.points)
    return kept


def taken(path: Path) -> bool:
    return os.path.lexists(path)


def place_image(item: Item, dst: Path, *, copy: bool, stats: ExportStats) -> None:
    """Put the image at ``dst``: an upright re-encoded copy when the file carries an EXIF
    rotation (see the package docstring), else a byte copy or an absolute symlink (an
    image on object storage is always written out: a URI cannot be linked)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if item.orientation != 1:
        write_upright(item.source if item.data is None else item.data, dst)
        stats.upright_copies += 1
    elif item.data is not None:
        dst.write_bytes(item.data)
    elif copy:
        shutil.copy2(item.source, dst)
    else:
        os.symlink(item.source, dst)


def write_upright(source: Path | bytes, dst: Path) -> None:
    """The displayed image, EXIF orientation removed (other EXIF kept), in the source's
    format; JPEG at quality 95, the least loss a re-encode allows at a sane size."""
    with open_header(source) as im:
        fmt = "JPEG" if im.format in ("JPEG", "MPO") else im.format
        icc = im.info.get("icc_profile")
        upright = ImageOps.exif_transpose(im)
        exif = upright.getexif()
        exif.pop(EXIF_ORIENTATION, None)
        options: dict[str, Any] = {"exif": exif.tobytes()}
        if icc:
            options["icc_profile"] = icc
        if fmt == "JPEG":
            options["quality"] = 95
        upright.save(dst, format=fmt, **options)


def placed_items(records: Iterable[dict[str, Any]], images_root: Path | str, images_dir: Path,
                 *, copy: bool, stats: ExportStats) -> Iterator[Item]:
    """The exportable items (:func:`iter_items`), each image placed at
    ``images_dir/<relative path>`` first (:func:`place_image`); a record whose image is
    already there is skipped as listed twice. For the formats that keep the images'
    folders (COCO, CVAT); YOLO and VOC flatten names and place their own."""
    for item in iter_items(records, images_root, stats):
        dst = images_dir / item.relative
        if taken(dst):
            stats.skip(item.relative, "listed twice in the records")
            continue
        place_image(item, dst, copy=copy, stats=stats)
        yield item
