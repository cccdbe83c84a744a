"""grounding: vision-language models as object detectors and auto-labelers."""

from __future__ import annotations

__version__ = "0.1.0"

from grounding.core.assemble import build_result, result_from_text
from grounding.core.classes import ClassMap
from grounding.core.dialects import DIALECTS, Dialect, get_dialect, parse
from grounding.core.errors import GeometryError, GroundingError, ImageLoadError
from grounding.core.geometry import model_frame, smart_resize
from grounding.core.result import Box, Point, Result
from grounding.io.images import load_image
from grounding.parsing import ParsedOutput, RawObject
from grounding.pipeline.detector import Detector

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
