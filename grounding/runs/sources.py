"""What a run labels: a local folder, a list of image paths, or a folder on object storage.

``grounding label IMAGES`` takes any of:

- a local folder: every image under it (:func:`~grounding.runs.rundir.find_images`),
  records named by the path relative to it, as runs always were;
- a list file, local or on object storage, by suffix: ``.txt`` (one path per line; blank
  lines and ``#`` comments skipped), ``.jsonl`` (per line a JSON string, or an object with
  an ``"image"`` or ``"path"`` key) or ``.parquet`` (an ``image`` or ``path`` column).
  Records keep each entry as written; a relative entry is read from the list's folder;
- a folder on object storage (``s3://bucket/prefix``, ``gs://...``, anything
  :mod:`grounding.io.storage` reads): every image under it, records keeping the full URI,
  so every worker of a distributed run finds the image by its record alone.

run.json records :attr:`ImageSet.root`; :func:`image_base` turns that back into where
relative record names resolve, for export, eval and masks.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from grounding.core.errors import GroundingError, StorageError
from grounding.io import storage
from grounding.io.images import IMAGE_EXTENSIONS
from grounding.runs.rundir import describe_extensions, find_images

LIST_SUFFIXES = (".txt", ".jsonl", ".parquet")
"""What makes a path a list of images rather than a folder (lower-cased suffix)."""

_LIST_FORMATS = ("one path per line in a .txt, a JSON string or an object with an "
                 "\"image\" or \"path\" key per line in a .jsonl, or an \"image\" or "
                 "\"path\" column in a .parquet")


class NoImagesError(GroundingError):
    """The images folder or list holds no image, does not exist or cannot be read."""


@dataclass(frozen=True)
class ImageSet:
    """The images of a run, picklable. A local folder is walked again on each
    :meth:`keys` (lazily: checking it holds an image stops at the first); a list or a
    bucket folder, which must be read or listed whole, is read once, by
    :func:`open_images`, and its keys kept (``listed``)."""

    root: str
    """What run.json records as ``images_dir``: the local folder or list file (resolved),
    or the URI as given (no trailing ``/``)."""
    base: str
    """Where relative keys resolve: the folder, or the list file's folder."""
    kind: str = "folder"
    """``folder`` (local), ``bucket`` (a folder on object storage) or ``list``."""
    exclude: tuple[str, ...] = ()
    """Local folders: directories not to look in (the run being written)."""
    listed: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    """The keys, when they were already read (lists and buckets, by open_images)."""

    def keys(self) -> Iterator[str]:
        """The record ``image`` of each image, in a stable order: the sorted walk of a
        folder, or the list's order with repeats dropped."""
        if self.listed is not None:
            return iter(self.listed)
        if self.kind == "folder":
            return find_images(Path(self.root), self.exclude)
        if self.kind == "bucket":
            return _bucket_images(self.root)
        return _unique(_read_list(self.root))

    def location(self, key: str) -> str:
        """Where the image of record ``key`` is read from (a path or a URI)."""
        return storage.join(self.base, key)


def open_images(spec: str | Path, exclude: Iterable[str | Path] = ()) -> ImageSet:
    """The images named by ``spec`` (a folder, list file or URI: see the module), checked
    to hold at least one; :class:`NoImagesError` (one line) otherwise. ``exclude``: local
    folders not to look in (the run directory being written)."""
    text = os.fspath(spec)
    local = storage.local_path(text)
    if local is None:
        head, sep, rest = text.partition("://")
        return _open_uri(head + sep + rest.rstrip("/"))
    path = Path(local)
    if not path.exists():
        raise NoImagesError(f"{text}: no such folder or list file")
    if path.is_dir():
        images = ImageSet(str(path.resolve()), str(path.resolve()), "folder",
                          tuple(str(p) for p in exclude))
        if next(images.keys(), None) is None:
            raise NoImagesError(f"no images in {text}: looked for {describe_extensions()}")
        return images
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise NoImagesError(f"{text} is neither a folder nor a list of images "
                            f"({', '.join(LIST_SUFFIXES)})")
    resolved = path.resolve()
    return _checked_list(ImageSet(str(resolved), str(resolved.parent), "list"), text)


def image_base(images_dir: str) -> str:
    """Where the relative record names of a run resolve, from its run.json
    ``images_dir``: a list file's folder, else ``images_dir`` itself."""
    local = storage.local_path(images_dir)
    if local is not None:
        if os.path.isdir(local) or Path(local).suffix.lower() not in LIST_SUFFIXES:
            return local
        return str(Path(local).parent)
    if posixpath.splitext(images_dir.rstrip("/"))[1].lower() in LIST_SUFFIXES:
        return storage.parent(images_dir)
    return images_dir.rstrip("/")


def _open_uri(uri: str) -> ImageSet:
    if posixpath.splitext(uri.split("?", 1)[0])[1].lower() in LIST_SUFFIXES:
        return _checked_list(ImageSet(uri, storage.parent(uri), "list"), uri)
    try:
        keys = tuple(_bucket_images(uri))
    except StorageError as exc:
        raise NoImagesError(str(exc)) from None
    if not keys:
        raise NoImagesError(f"no images in {uri}: looked for {describe_extensions()}")
    return ImageSet(uri, uri, "bucket", listed=keys)


def _checked_list(images: ImageSet, shown: str) -> ImageSet:
    """The list, read whole now, so a missing file or a malformed line fails before the
    run starts, not halfway through it, and its keys kept for the run."""
    keys = tuple(images.keys())
    if not keys:
        raise NoImagesError(f"no images in {shown}: looked for {_LIST_FORMATS}")
    return replace(images, listed=keys)


def _bucket_images(uri: str) -> Iterator[str]:
    for found in storage.list_files(uri):
        if posixpath.splitext(found.split("?", 1)[0])[1].lower() in IMAGE_EXTENSIONS:
            yield found


def _unique(keys: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for key in keys:
        if key not in seen:
            seen.add(key)
            yield key


def _read_list(location: str) -> Iterator[str]:
    """Each entry of the list file at ``location``, as written; NoImagesError naming the
    file (and the line) when it cannot be read or an entry is malformed."""
    suffix = posixpath.splitext(location.split("?", 1)[0])[1].lower()
    try:
        data = storage.read_bytes(location)
    except StorageError as exc:
        raise NoImagesError(str(exc)) from None
    if suffix == ".parquet":
        yield from _parquet_entries(location, data)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NoImagesError(f"{location}: not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or (suffix == ".txt" and entry.startswith("#")):
            continue
        yield _json_entry(location, number, entry) if suffix == ".jsonl" else entry


def _json_entry(location: str, number: int, line: str) -> str:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise NoImagesError(f"{location}:{number}: not JSON ({exc})") from None
    if isinstance(value, dict):
        value = value.get("image", value.get("path"))
    if not isinstance(value, str) or not value:
        raise NoImagesError(f"{location}:{number}: expected a JSON string or an object "
                            "with an \"image\" or \"path\" key holding a path")
    return value


def _parquet_entries(location: str, data: bytes) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NoImagesError(f"{location}: reading a .parquet list needs pyarrow: "
                            f"{storage.INSTALL_HINT}") from None
    try:
        table = pq.ParquetFile(io.BytesIO(data))
        names = table.schema_arrow.names
        column = next((c for c in ("image", "path") if c in names), None)
        if column is None:
            raise NoImagesError(f"{location}: no \"image\" or \"path\" column (columns: "
                                f"{', '.join(names) or 'none'})")
        row = 0
        for batch in table.iter_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str) or not value:
                    raise NoImagesError(f"{location}: row {row}: {column} is "
                                        f"{value!r}, not a path")
                yield value
    except NoImagesError:
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError for a bad file
        first = str(exc).split("\n", 1)[0]
        raise NoImagesError(f"{location}: not a readable parquet file ({first})") from None
