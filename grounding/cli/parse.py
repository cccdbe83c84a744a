"""grounding parse: a model's answer as JSON records, without running a model."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from grounding.cli import options as opt
from grounding.cli.common import fail
from grounding.core.classes import ClassMap
from grounding.core.dialects import DIALECTS, get_dialect
from grounding.core.errors import GroundingError
from grounding.core.geometry import model_frame, resolve_budget

_SIZE = re.compile(r"^\s*(\d+)\s*[xX*,]\s*(\d+)\s*$")


def _size(text: str | None, option: str) -> tuple[int, int] | None:
    if text is None:
        return None
    m = _SIZE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise typer.BadParameter(f"expected WIDTHxHEIGHT, e.g. 1280x720; got {text!r}",
                                 param_hint=option)
    return int(m.group(1)), int(m.group(2))


def parse(
    file: Annotated[str, typer.Argument(help="A file holding the model's answer, or - for stdin.")],
    dialect: Annotated[str, typer.Option(
        "--dialect", "-d", help=f"How the model writes locations: {', '.join(DIALECTS)}.")],
    input_size: Annotated[str | None, typer.Option(
        help="The model frame WxH (the image size the model saw). Needed by qwen2.5-vl to "
             "rescale; derived from --image-size and the pixel budget when omitted.")] = None,
    image_size: Annotated[str | None, typer.Option(
        help="The original image's displayed WxH: coordinates are rescaled into it.")] = None,
    classes: Annotated[str | None, typer.Option(
        help='Comma-separated class names, e.g. "person,car": labels get class ids.')] = None,
    min_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget used to derive --input-size (default: the one detect and label "
             "use, see README 'Pixel budget').")
    ] = None,
    max_pixels: Annotated[int | None, typer.Option(
        help="Pixel budget used to derive --input-size (default: the one detect and label "
             "use, see README 'Pixel budget').")
    ] = None,
    dedup_iou: opt.DedupIou = None,
    no_dedup: opt.NoDedup = False,
    dedup_agnostic: opt.DedupAgnostic = False,
    box_key: opt.BoxKey = None,
    point_key: opt.PointKey = None,
    label_key: opt.LabelKey = None,
) -> None:
    """Read a model's answer and print the JSON record of every box and point in it.

    Without sizes the coordinates stay in the model's frame; with --image-size they are
    rescaled onto the original image and clipped to it. This is how to debug what a model
    actually said: `grounding parse answer.txt -d qwen2.5-vl --image-size 1024x1024`.
    """
    from grounding.core.assemble import result_from_text

    try:
        d = get_dialect(dialect)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dialect") from None
    frame = _size(input_size, "--input-size")
    image = _size(image_size, "--image-size")
    if file == "-":
        text = sys.stdin.read()
    else:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {file}: {exc}")
    try:
        if image is not None and frame is None:
            # The budget detect and label run with, so a pasted answer lands where it did.
            low, high = resolve_budget(d, min_pixels, max_pixels)
            frame = model_frame(d, *image, min_pixels=low, max_pixels=high)
            if not d.is_relative:
                typer.echo(f"note: input size {frame[0]}x{frame[1]} derived from the image "
                           f"size and the pixel budget detect and label use ({low:,} .. "
                           f"{high:,} pixels); pass --input-size if the model saw another",
                           err=True)
        result = result_from_text(
            text, d, image_size=image, input_size=frame,
            classes=ClassMap.parse(classes) if classes else None,
            image=None if file == "-" else file,
            dedup_iou=opt.dedup_iou(dedup_iou, no_dedup, dedup_agnostic),
            dedup_agnostic=dedup_agnostic,
            keys=opt.keys(box_key, point_key, label_key),
        )
    except (GroundingError, ValueError) as exc:
        fail(exc)
    typer.echo(result.to_json())
