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
