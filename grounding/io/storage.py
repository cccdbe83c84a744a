"""Read images and lists from local disk or object storage (s3://, gs://, ...) alike.

A run's images can live in a bucket that every worker reads, so one place says what a
location is (:func:`is_uri`), where a record's image is (:func:`join`) and how its bytes
are read (:func:`read_bytes`). Object storage goes through pyarrow's filesystems (S3
honours the standard AWS variables, ``AWS_ENDPOINT_URL`` included, for an S3-compatible
server), else fsspec for schemes pyarrow does not know; both are optional and imported
only when a URI is read. Every failure is a :class:`StorageError`: one line naming the
location and the cause.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from grounding.core.errors import StorageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
"""A scheme of two or more characters, so a Windows drive (``C:\\``, ``C://``) is a path."""

INSTALL_HINT = "pip install 'grounding[ray]'"

_CACHED_SCHEMES = ("s3", "gs", "gcs")
"""Schemes whose filesystem is kept per bucket: making one (credentials, region lookup)
costs more than reading an image, and these name the bucket first in the path."""
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "STORAGE_EMULATOR")
_filesystems: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()


def is_uri(text: str | os.PathLike) -> bool:
    """Whether ``text`` is ``scheme://...`` (``file://`` included; a Path never is)."""
    return isinstance(text, str) and _SCHEME.match(text) is not None


def scheme(text: str) -> str | None:
    """The URI's scheme, lower-cased; None for a local path."""
    match = _SCHEME.match(text) if isinstance(text, str) else None
    return match.group(1).lower() if match else None


def local_path(location: str | os.PathLike) -> str | None:
    """The local path of a path or ``file://`` URI; None for any other URI."""
    if not is_uri(location):
        return os.fspath(location)
    if scheme(str(location)) == "file":
        parts = urlsplit(str(location))
        return unquote(parts.path) if parts.netloc in ("", "localhost") else None
    return None


def join(base: str, key: str) -> str:
    """Where a record's image is: ``key`` itself when it is a URI or an absolute path,
    else ``key`` under ``base`` (a URI base gets one ``/``; a local one os.path.join)."""
    if is_uri(key) or os.path.isabs(key):
        return key
    if is_uri(base):
        return base.rstrip("/") + "/" + key.lstrip("/")
    return os.path.join(base, key)


def parent(location: str) -> str:
    """The folder holding ``location`` (a URI keeps its scheme and bucket)."""
    if is_uri(location) and scheme(location) != "file":
        head, sep, rest = location.rstrip("/").partition("://")
        return head + sep + rest.rpartition("/")[0] if "/" in rest else location
    path = local_path(location) or location
    return os.path.dirname(os.path.abspath(path))


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole content of a local file or an object; :class:`StorageError` (``missing``
    when it is not there) otherwise."""
    path = local_path(location)
    if path is not None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise _local_error(str(location), exc) from None
    uri = str(location)
    fs, path = _filesystem(uri)
    if fs is None:  # fsspec
        return _fsspec_read(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as exc:  # pyarrow raises OSError subclasses and ArrowException
        raise _remote_error(uri, exc, "no such object") from None


def list_files(uri: str) -> Iterator[str]:
    """Every file under the folder ``uri``, recursively, as full URIs, sorted (listed at
    the call, so a missing folder fails there); a local path or ``file://`` URI lists
    local files. :class:`StorageError` when the folder does not exist or cannot be
    listed."""
    local = local_path(uri)
    if local is not None:
        return iter(_list_local(uri, local))
    fs, path = _filesystem(uri)
    if fs is None:
        return iter(_fsspec_list(uri))
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            bucket = path.split("/", 1)[0]
            gone = bucket and bucket != path and \
                fs.get_file_info(bucket).type == pafs.FileType.NotFound
            raise StorageError(uri, "no such bucket" if gone else "no such folder",
                               missing=True)
        if info.type == pafs.FileType.File:
            raise StorageError(uri, "is a file, not a folder")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except StorageError:
        raise
    except Exception as exc:
        raise _remote_error(uri, exc, "no such folder") from None
    base = uri.split("?", 1)[0].rstrip("/")
    prefix = base[:len(base) - len(path)] if path and base.endswith(path) else \
        f"{scheme(uri)}://"
    return iter(sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File))


def _list_local(uri: str, path: str) -> list[str]:
    if not os.path.isdir(path):
        raise StorageError(uri, "no such folder" if not os.path.exists(path)
                           else "is a file, not a folder", missing=not os.path.exists(path))
    found = []
    for directory, _dirs, files in os.walk(path):
        found.extend(os.path.join(directory, name) for name in files)
    return sorted(found)


def _filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem for ``uri`` and the path in it; ``(None, uri)`` when pyarrow
    does not know the scheme (or is not installed) and fsspec should read it."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        return None, uri
    kind = scheme(uri)
    rest = uri.split("://", 1)[1]
    key = None
    if kind in _CACHED_SCHEMES and "?" not in rest:
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
        key = (kind, rest.split("/", 1)[0], env)
        with _lock:
            fs = _filesystems.get(key)
        if fs is not None:
            return fs, rest.rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(_with_endpoint(uri))
    except Exception as exc:
        if isinstance(exc, ValueError) and "Unrecognized filesystem type" in str(exc):
            return None, uri
        raise _remote_error(uri, exc, "no such bucket") from None
    if key is not None:
        with _lock:
            _filesystems[key] = fs
    return fs, path


def _with_endpoint(uri: str) -> str:
    """An S3 URI with the endpoint variable spelled out for a pyarrow too old to read it:
    ``FileSystem.from_uri`` honours ``AWS_ENDPOINT_URL`` since Arrow 13 (apache/arrow
    GH-36770) and ``AWS_ENDPOINT_URL_S3`` since Arrow 16 (GH-38663); a bare
    ``S3FileSystem()`` honours neither, so S3 is always opened by URI here."""
    if scheme(uri) != "s3" or "?" in uri:
        return uri
    import pyarrow

    major = int(pyarrow.__version__.split(".")[0])
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") if major < 16 else None) or \
        (os.environ.get("AWS_ENDPOINT_URL") if major < 13 else None)
    if not endpoint:
        return uri
    parts = urlsplit(endpoint)
    return f"{uri}?endpoint_override={parts.netloc}&scheme={parts.scheme or 'https'}"


def _fsspec():
    try:
        import fsspec
    except ImportError:
        return None
    return fsspec


def _no_reader(uri: str) -> StorageError:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return StorageError(uri, f"reading it needs pyarrow: {INSTALL_HINT}")
    return StorageError(uri, f"pyarrow cannot read {scheme(uri)}:// and fsspec is not "
                             "installed: pip install fsspec (and its backend for it)")


def _fsspec_read(uri: str) -> bytes:
    fsspec = _fsspec()
    if fsspec is None:
        raise _no_reader(uri)
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except Exception as exc:  # each backend raises its own
        raise _remote_error(uri, exc, "no such object") from None


def _fsspec_list(uri: str) -> list[str]:
    fsspec = _fsspec()
    if fsspec is None:
        raise _no_reader(uri)
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise StorageError(uri, "no such folder", missing=True)
        if fs.isfile(path):
            raise StorageError(uri, "is a file, not a folder")
        found = fs.find(path)
    except StorageError:
        raise
    except Exception as exc:
        raise _remote_error(uri, exc, "no such folder") from None
    return sorted(fs.unstrip_protocol(p) for p in found)


def _local_error(location: str, exc: OSError) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(location, "no such file", missing=True)
    if isinstance(exc, IsADirectoryError):
        return StorageError(location, "is a folder, not a file")
    if isinstance(exc, PermissionError):
        return StorageError(location, "permission denied")
    return StorageError(location, exc.strerror or str(exc))


def _remote_error(uri: str, exc: BaseException, not_found: str) -> StorageError:
    """One line for what pyarrow or fsspec raised (their messages can span many lines)."""
    text = " ".join(str(exc).split("\n", 1)[0].split()) or type(exc).__name__
    upper = text.upper()
    if isinstance(exc, FileNotFoundError) or "NO_SUCH_KEY" in upper:
        return StorageError(uri, not_found, missing=True)
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        return StorageError(uri, "no such bucket", missing=True)
    if isinstance(exc, PermissionError) or "ACCESS_DENIED" in upper or \
            "ACCESSDENIED" in upper or "FORBIDDEN" in upper:
        return StorageError(uri, f"access denied ({_short(text)})")
    if isinstance(exc, ImportError):
        return StorageError(uri, f"{_short(text)}")
    return StorageError(uri, _short(text))


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
