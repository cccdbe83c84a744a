"""The exceptions grounding raises on purpose, so callers can catch them apart from bugs."""

from __future__ import annotations


class GroundingError(Exception):
    """Base class for every error grounding raises deliberately."""


class ImageLoadError(GroundingError):
    """An input could not be read as an image; the message names the input and the cause."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image {source}: {reason}")


class GeometryError(GroundingError):
    """A size or pixel budget for which no model frame exists."""


class StorageError(GroundingError):
    """A file or folder on local disk or object storage could not be read or listed; the
    message is one line naming the location and the cause. ``missing`` tells "not there"
    (an export counts it as a missing image) from every other failure."""

    def __init__(self, location: str, reason: str, *, missing: bool = False) -> None:
        self.location = location
        self.reason = reason
        self.missing = missing
        super().__init__(f"{location}: {reason}")
