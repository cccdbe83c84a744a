"""What a perfect grounding model writes: a box in each dialect's own syntax. Shared by
:class:`~grounding.testing.static.StaticBackend` and the loopback server's
:func:`~grounding.testing.loopback.grounding_handler`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["answer_objects", "answer_text", "object_line"]

_EMPTY_JSON = "```json\n[]\n```"


def _num(value: float) -> str:
    """Integers as integers, anything else with 3 decimals (a model writes integers; the
    decimals keep a relative answer exact to a fraction of a pixel)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def answer_text(dialect: Any, box: Sequence[float] | None, label: str) -> str:
    """``box`` (already in the dialect's coordinate frame) written in the dialect's syntax;
    ``None``: the dialect's way of saying there is nothing."""
    return answer_objects(dialect, [] if box is None else [(box, label)])


def answer_objects(dialect: Any, objects: Sequence[tuple[Sequence[float], str]]) -> str:
    """Several ``(box, label)`` (boxes already in the dialect's coordinate frame) in the
    dialect's syntax, in order: one JSON list for Qwen2.5-VL and Qwen3-VL, one reference
    run per object for the others (``<ref>label</ref><box>...</box><ref>...``). No
    objects: the dialect's way of saying there is nothing."""
    from grounding.core.dialects import get_dialect

    name = get_dialect(dialect).name
    if not objects:
        return {"qwen2.5-vl": _EMPTY_JSON, "qwen3-vl": _EMPTY_JSON}.get(
            name, "There is none in the image.")
    if name in ("qwen2.5-vl", "qwen3-vl"):
        return "```json\n[\n" + ",\n".join(object_line(name, b, lab)
                                           for b, lab in objects) + "\n]\n```"
    return "".join(object_line(name, b, lab) for b, lab in objects)


def object_line(dialect: Any, box: Sequence[float], label: str) -> str:
    """One object as the dialect writes it inside an answer: a tab-indented JSON object
    (Qwen2.5-VL, Qwen3-VL; the separating comma is not part of it) or a reference run."""
    from grounding.core.dialects import get_dialect

    name = get_dialect(dialect).name
    x1, y1, x2, y2 = (_num(v) for v in box)
    if name in ("qwen2.5-vl", "qwen3-vl"):
        return f'\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": {json.dumps(label)}}}'
    if name == "qwen2-vl":
        return (f"<|object_ref_start|>{label}<|object_ref_end|>"
                f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
    if name == "qwen-vl":
        return f"<ref>{label}</ref><box>({x1},{y1}),({x2},{y2})</box>"
    if name == "deepseek-vl2":
        return f"<|ref|>{label}<|/ref|><|det|>[[{x1}, {y1}, {x2}, {y2}]]<|/det|>"
    raise ValueError(f"no answer syntax for dialect {name}")
