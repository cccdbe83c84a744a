"""Built-in prompts per dialect, worded as the official cookbooks word them.

Qwen2.5-VL (cookbooks/spatial_understanding.ipynb): "Outline the position of each small
cake and output all the coordinates in JSON format.", "Locate the top right brown cake,
output its bbox coordinates using JSON format.". Qwen3-VL (cookbooks/2d_grounding.ipynb):
'Locate every instance that belongs to the following categories: "...". Report bbox
coordinates in JSON format.', and for points "... Output the point coordinates in JSON
format.". DeepSeek-VL2 grounds with ``<|grounding|>`` and ``<|ref|>`` tags; Qwen2-VL and
Qwen-VL with their reference tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from grounding.core.dialects import Dialect, get_dialect

Task = Literal["boxes", "points"]


def _join(classes: Sequence[str]) -> str:
    return ", ".join(classes)


def class_prompt(dialect: str | Dialect, classes: Sequence[str], task: Task = "boxes") -> str:
    """Ask for every instance of a list of classes."""
    d = get_dialect(dialect)
    if not classes:
        raise ValueError("no classes to look for")
    names = _join(classes)
    if d.name == "qwen2.5-vl":
        if task == "points":
            return (f"Point to each {names} in the image and output all the point coordinates "
                    'in JSON format, as [{"point_2d": [x, y], "label": "..."}].')
        return (f"Outline the position of each {names} and output all the coordinates in JSON "
                'format, as [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}].')
    if d.name == "qwen3-vl":
        what = "point" if task == "points" else "bbox"
        return (f'Locate every instance that belongs to the following categories: "{names}". '
                f"Report {what} coordinates in JSON format.")
    return expression_prompt(d, names, task)


def expression_prompt(dialect: str | Dialect, expression: str, task: Task = "boxes") -> str:
    """Ask for what a free-text referring expression describes."""
    d = get_dialect(dialect)
    expression = expression.strip()
    if d.name == "qwen2.5-vl":
        if task == "points":
            return f"Locate {expression}, output its point coordinates using JSON format."
        return f"Locate {expression}, output its bbox coordinates using JSON format."
    if d.name == "qwen3-vl":
        what = "point" if task == "points" else "bbox"
        return f"Locate {expression}, report the {what} coordinates in JSON format."
    if d.name == "qwen2-vl":
        return f"Find <|object_ref_start|>{expression}<|object_ref_end|> in the image."
    if d.name == "qwen-vl":
        return f"Find <ref>{expression}</ref> in the image."
    if d.name == "deepseek-vl2":
        return f"<|grounding|>Locate <|ref|>{expression}<|/ref|> in the given image."
    raise ValueError(f"no built-in prompt for dialect {d.name}")


def with_references(prompt: str, count: int) -> str:
    """``prompt`` for a message that shows ``count`` example images before the image to
    look at: the model is told which image the coordinates must refer to."""
    if count <= 0:
        return prompt
    shown = ("The first image is an example" if count == 1
             else f"The first {count} images are examples")
    return f"{shown} of what to find; answer about the last image only. {prompt}"
