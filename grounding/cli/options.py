"""Options more than one command takes, each declared once.

The backend options are generated from grounding.backends.options (the dataclasses the
backends take their defaults from); the options detect and label share beyond the backend
are the fields of :class:`DetectionOptions`. :func:`with_options` gives a command a group
of options after its own and hands the group to it as one value.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from grounding.backends.options import (
    BACKENDS,
    DEFAULT_MAX_NEW_TOKENS,
    BackendOptions,
    RemoteOptions,
    own_fields,
)
from grounding.core.dedup import DEFAULT_DEDUP_IOU
from grounding.core.tiles import DEFAULT_TILE_OVERLAP

Option = tuple[str, Any, Any]
"""A command-line option as a command parameter: (name, Annotated type, default)."""


def flag(*names: str, help: str) -> Any:
    """A boolean option: ``--name`` alone means true (``--name/--no-name`` for both), no
    value follows it, and --help shows none (typer's rich help would show ``<bool>``)."""
    return typer.Option(*names, help=help, metavar="")


def field_option(cls: type[BackendOptions], name: str) -> Option:
    """The option of field ``name`` of a backend's options: its help (prefixed with the
    backend's --backend value when the field is that backend's own), range, name, type
    and default, all from the dataclass."""
    field = cls.__dataclass_fields__[name]
    meta = field.metadata
    prefix = f"{cls.kind}: " if cls.kind and field in own_fields(cls) else ""
    kind = meta["cli_type"] or get_type_hints(cls)[name]
    if kind is bool:
        option = flag(help=prefix + meta["help"])
    else:
        option = typer.Option(help=prefix + meta["help"], min=meta["min"], max=meta["max"])
    return meta["flag"] or name, Annotated[kind, option], field.default


def option_type(cls: type[BackendOptions], name: str) -> Any:
    """The Annotated type of a ``cli="command"`` field's option; the command gives the
    default (see MaxNewTokens)."""
    return field_option(cls, name)[1]


def backend_options() -> tuple[Option, ...]:
    """--backend, then every ``cli="backend"`` field: the common ones, then each backend's
    own, in declaration order."""
    kind = Annotated[str, typer.Option(
        "--backend", help="local: transformers in this process; openai: an OpenAI-compatible "
                          "server (vLLM, SGLang, hosted APIs).")]
    options: list[Option] = [("backend", kind, "local")]
    for cls in (BackendOptions, *BACKENDS.values()):
        options += [field_option(cls, f.name) for f in own_fields(cls)
                    if f.metadata["cli"] == "backend"]
    return tuple(options)


def cli_names(cls: type[BackendOptions]) -> dict[str, str]:
    """Each field of ``cls`` by the name of its command-line parameter."""
    return {f.metadata["flag"] or f.name: f.name for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class OptionGroup:
    """Options that reach a command as one value: ``build(**values)``."""

    options: tuple[Option, ...]
    build: Callable[..., Any] = dict


def with_options(**groups: OptionGroup):
    """Give a command the options of each group after its own; a group reaches the
    command as one value, in its parameter of the group's name (a placeholder in the
    command's signature), so commands share one definition."""

    def wrap(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in groups]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                    annotation=annotation)
                  for group in groups.values() for name, annotation, default in group.options]

        @functools.wraps(command)
        def run(**kwargs):
            for key, group in groups.items():
                kwargs[key] = group.build(**{name: kwargs.pop(name)
                                             for name, _, _ in group.options})
            return command(**kwargs)

        run.__signature__ = signature.replace(parameters=own + shared)
        run.__annotations__ = {p.name: p.annotation for p in own + shared}
        return run

    return wrap


# -- what the commands that run a model say ---------------------------------------------

Classes = Annotated[str | None, typer.Option(
    help='Comma-separated classes to find, e.g. "person,car".')]
Ontology = Annotated[Path | None, typer.Option(
    help='JSON file mapping prompt phrases to class names: {"pedestrian": "person"}.')]
Points = Annotated[bool, flag("--points", help="Ask for points, not boxes.")]
References = Annotated[list[Path] | None, typer.Option(
    "--reference", help="An example image shown before every image in the same message "
                        "(repeatable): find more like it. Coordinates still refer to each "
                        "image.")]
System = Annotated[str | None, typer.Option(help="System prompt.")]
MaxNewTokens = option_type(BackendOptions, "max_new_tokens")
JsonSchema = option_type(RemoteOptions, "json_schema")

DedupIou = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Same-class boxes overlapping above this IoU are one object written "
                           "twice: the best scored (else the first written) is kept, the "
                           f"others counted in dropped.duplicate; 1.0 removes only identical "
                           f"boxes. Default {DEFAULT_DEDUP_IOU}.")]
NoDedup = Annotated[bool, flag("--no-dedup", help="Keep duplicate boxes and points.")]
DedupAgnostic = Annotated[bool, flag(
    "--dedup-agnostic", help="Boxes of different classes can be duplicates too.")]

BoxKey = Annotated[str | None, typer.Option(
    help="With a prompt of your own: the key your answers hold each box under (default: "
         "any list of 4 numbers is a box, see README).")]
PointKey = Annotated[str | None, typer.Option(
    help="With a prompt of your own: the key your answers hold each point under.")]
LabelKey = Annotated[str | None, typer.Option(
    help="With a prompt of your own: the key your answers hold each label under.")]


def dedup_iou(dedup_iou: float | None, no_dedup: bool, dedup_agnostic: bool) -> float | None:
    """The dedup threshold of --dedup-iou / --no-dedup (None: off); typer.BadParameter
    when --no-dedup comes with a setting of what it turns off."""
    if no_dedup and (dedup_iou is not None or dedup_agnostic):
        raise typer.BadParameter("--no-dedup turns duplicate removal off; --dedup-iou and "
                                 "--dedup-agnostic say how to do it: give one or the other",
                                 param_hint="--no-dedup")
    if no_dedup:
        return None
    return DEFAULT_DEDUP_IOU if dedup_iou is None else dedup_iou


def keys(box_key: str | None, point_key: str | None, label_key: str | None):
    """The parsing.Keys of --box-key, --point-key and --label-key (None when none)."""
    from grounding.parsing import Keys

    return Keys(box_key, point_key, label_key) or None


BACKEND = OptionGroup(backend_options())
"""The backend options of every command that runs a model, as one dict by parameter name
(grounding.cli.backend.make_backend reads it)."""


@dataclass(frozen=True)
class DetectionOptions:
    """What detect and label take beyond the backend: how images are batched, how long
    an answer may be, the system prompt, and which boxes are kept. Each field's type is
    its option."""

    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Images handed to the backend at once (local default 4; openai default "
                    "4 x concurrency).")] = None
    max_new_tokens: MaxNewTokens = DEFAULT_MAX_NEW_TOKENS
    system: System = None
    json_schema: JsonSchema = RemoteOptions.json_schema
    min_score: Annotated[float | None, typer.Option(
        help="Drop boxes and points scored below this (token log-probability rule, see "
             "README; unscored ones are kept).")] = None
    verify: Annotated[bool, flag(
        "--verify", help='Ask the model about every box "Is this a LABEL? Answer yes or no." '
                         "(a crop with context, one token) and drop the boxes it doubts; the "
                         "score is kept as attributes.verify_score (see README).")] = False
    verify_threshold: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="--verify: drop boxes with P(yes) / (P(yes) + P(no)) below "
                               "this.")] = 0.5
    dedup_iou: DedupIou = None
    no_dedup: NoDedup = False
    dedup_agnostic: DedupAgnostic = False
    per_class: Annotated[bool | None, typer.Option(
        "--per-class/--no-per-class",
        help="One request per class, each answer labelled with its class (default: on for "
             "models that ground one reference at a time: qwen-vl, qwen2-vl, deepseek-vl2). "
             "With --prompt, put {class} where each class goes.")] = None
    tiles: Annotated[str | None, typer.Option(
        metavar="auto|COLSxROWS",
        help="Ask about overlapping tiles of each image (small objects in large images); "
             "auto: the fewest tiles the model sees at full resolution.")] = None
    tile_overlap: Annotated[float | None, typer.Option(
        min=0.0, max=0.9, help="--tiles: the share of a tile its neighbour also sees "
                               f"(default {DEFAULT_TILE_OVERLAP}).")] = None
    tiles_with_full: Annotated[bool, flag(
        "--tiles-with-full", help="--tiles: also ask about the whole image, for objects "
                                  "larger than a tile.")] = False
    box_key: BoxKey = None
    point_key: PointKey = None
    label_key: LabelKey = None
    masks: Annotated[bool, flag(
        "--masks", help="Segment every box with SAM 2 (transformers): a COCO RLE mask per "
                        "box in the record, drawn on overlays; grounding export writes "
                        "them (--mask-format, --yolo-task segment).")] = False
    mask_model: Annotated[str | None, typer.Option(
        help="--masks: the segmenter checkpoint (default facebook/sam2.1-hiera-large; any "
             "SAM 2 checkpoint transformers loads).")] = None

    def __post_init__(self) -> None:
        # Malformed or contradictory options fail before a model is loaded.
        self.tiling()
        dedup_iou(self.dedup_iou, self.no_dedup, self.dedup_agnostic)
        if self.mask_model is not None and not self.masks:
            raise typer.BadParameter("--mask-model needs --masks", param_hint="--mask-model")

    def segmenter(self, engine=None, *, describe: bool = False):
        """The segmenter of --masks (None without it), on ``engine``'s device when it has
        one (a local model's GPU); GroundingError (one line) when the mask model cannot
        be loaded. ``describe``: checked from its config, not loaded (it runs elsewhere)."""
        if not self.masks:
            return None
        from grounding.backends.segment import DEFAULT_MASK_MODEL, SamSegmenter

        model = self.mask_model or DEFAULT_MASK_MODEL
        if describe:
            return SamSegmenter.describe(model)
        return SamSegmenter(model, device=getattr(engine, "device", None))

    def detector(self, engine, segmenter=None):
        """The Detector running ``engine`` with these options (and ``segmenter``, from
        :meth:`segmenter`, with --masks)."""
        from grounding.pipeline.detector import Detector

        return Detector(engine, batch_size=self.batch_size, min_score=self.min_score,
                        verify=self.verify, verify_threshold=self.verify_threshold,
                        dedup_iou=dedup_iou(self.dedup_iou, self.no_dedup,
                                            self.dedup_agnostic),
                        masks=segmenter if self.masks else None,
                        dedup_agnostic=self.dedup_agnostic)

    def tiling(self):
        """The Tiling of --tiles (None without it); typer.BadParameter when malformed."""
        from grounding.core.tiles import Tiling

        if self.tiles is None:
            for given, name in ((self.tiles_with_full, "--tiles-with-full"),
                                (self.tile_overlap is not None, "--tile-overlap")):
                if given:
                    raise typer.BadParameter(f"{name} needs --tiles", param_hint=name)
            return None
        overlap = DEFAULT_TILE_OVERLAP if self.tile_overlap is None else self.tile_overlap
        try:
            return Tiling.parse(self.tiles, overlap, self.tiles_with_full)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--tiles") from None


_DETECTION_HINTS = get_type_hints(DetectionOptions, include_extras=True)
DETECTION = OptionGroup(tuple((f.name, _DETECTION_HINTS[f.name], f.default)
                              for f in dataclasses.fields(DetectionOptions)), DetectionOptions)
"""DetectionOptions' fields as options; the command receives a DetectionOptions."""
