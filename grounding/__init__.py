"""grounding: vision-language models as object detectors and auto-labelers."""

from __future__ import annotations

from grounding._version import __version__
from grounding.core.assemble import build_result, result_from_text
from grounding.core.classes import ClassMap
from grounding.core.dedup import dedup
from grounding.core.dialects import DIALECTS, Dialect, get_dialect, parse
from grounding.core.errors import GeometryError, GroundingError, ImageLoadError
from grounding.core.geometry import model_frame, smart_resize
from grounding.core.result import Box, Point, Result
from grounding.core.tiles import Tiling
from grounding.formats import ExportStats, export_coco, export_labelstudio, export_yolo
from grounding.formats.evaluate import EvalReport, evaluate
from grounding.io.images import load_image
from grounding.parsing import ParsedOutput, RawObject
from grounding.pipeline.detector import Detector, Query, load_ontology
from grounding.pipeline.overlay import annotate  # also lends Result.annotate
from grounding.pipeline.qa import ask  # also lends Result.ask
from grounding.pipeline.verify import verify
from grounding.runs.labeling import label
from grounding.runs.merge import merge_runs
from grounding.runs.ray_engine import RayEngine
from grounding.runs.rundir import RunDir

__all__ = [
    "DIALECTS",
    "Box",
    "ClassMap",
    "Detector",
    "Dialect",
    "EvalReport",
    "ExportStats",
    "GeometryError",
    "GroundingError",
    "ImageLoadError",
    "ParsedOutput",
    "Point",
    "Query",
    "RawObject",
    "RayEngine",
    "Result",
    "RunDir",
    "Tiling",
    "__version__",
    "annotate",
    "ask",
    "build_result",
    "dedup",
    "evaluate",
    "export_coco",
    "export_labelstudio",
    "export_yolo",
    "get_dialect",
    "label",
    "load_image",
    "load_ontology",
    "merge_runs",
    "model_frame",
    "parse",
    "result_from_text",
    "smart_resize",
    "verify",
]
