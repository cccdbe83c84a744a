"""grounding: vision-language models as object detectors and auto-labelers."""

from __future__ import annotations

__version__ = "0.1.0"

from grounding.assemble import build_result, result_from_text
from grounding.classes import ClassMap
from grounding.detector import Detector
from grounding.dialects import DIALECTS, Dialect, get_dialect, parse
from grounding.errors import GeometryError, GroundingError, ImageLoadError
from grounding.geometry import model_frame, smart_resize
from grounding.images import load_image
from grounding.parsing import ParsedOutput, RawObject
from grounding.result import Box, Point, Result

__all__ = [
    "DIALECTS",
    "Box",
    "ClassMap",
    "Detector",
    "Dialect",
    "GeometryError",
    "GroundingError",
    "ImageLoadError",
    "ParsedOutput",
    "Point",
    "RawObject",
    "Result",
    "__version__",
    "build_result",
    "get_dialect",
    "load_image",
    "model_frame",
    "parse",
    "result_from_text",
    "smart_resize",
]
