"""What a perfect grounding model writes: a box in each dialect's own syntax. Shared by
:class:`~grounding.testing.static.StaticBackend` and the loopback server's
:func:`~grounding.testing.loopback.grounding_handler`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["answer_text"]

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
    from grounding.core.dialects import get_dialect

    name = get_dialect(dialect).name
    if box is None:
        return {"qwen2.5-vl": _EMPTY_JSON, "qwen3-vl": _EMPTY_JSON}.get(
            name, "There is none in the image.")
    x1, y1, x2, y2 = (_num(v) for v in box)
    if name in ("qwen2.5-vl", "qwen3-vl"):
        return (f'```json\n[\n\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], '
                f'"label": {json.dumps(label)}}}\n]\n```')
    if name == "qwen2-vl":
        return (f"<|object_ref_start|>{label}<|object_ref_end|>"
                f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
    if name == "qwen-vl":
        return f"<ref>{label}</ref><box>({x1},{y1}),({x2},{y2})</box>"
    if name == "deepseek-vl2":
        return f"<|ref|>{label}<|/ref|><|det|>[[{x1}, {y1}, {x2}, {y2}]]<|/det|>"
    raise ValueError(f"no answer syntax for dialect {name}")
