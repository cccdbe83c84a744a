"""A dialect = how a model family writes locations + which coordinate frame it uses.

Frames (sources checked while building this table):

* ``qwen2.5-vl``: absolute pixels of the image as the processor resized it (smart_resize,
  factor 28 = patch 14 x merge 2). Real answers hold values above 1000 on large inputs
  (tests/fixtures/real_outputs/qwen25vl_spatial_paper_fox_shadow_abs_gt1000.txt).
* ``qwen3-vl``: 0-1000 relative (Qwen3-VL cookbooks: "we use relative coordinates ...
  scaled from 0 to 1000"); its processor resizes with factor 32 (patch 16 x merge 2).
* ``qwen2-vl``: 0-1000 relative inside ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``.
* ``qwen-vl``: 0-1000 relative inside ``<box>(x1,y1),(x2,y2)</box>`` on a fixed 448x448
  input. The model's tokenizer draws boxes with ``x / 1000 * w``; the official RefCOCO
  script (eval_mm/evaluate_grounding.py) divides by 999. We follow the tokenizer; the two
  differ by at most 0.1% of the image size.
* ``deepseek-vl2``: 0-999 relative (``x / 999 * w`` in the DeepSeek-VL2 code and in
  supervision's parser); it tiles images itself, so there is no resize factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from grounding.parsing import (
    Keys,
    ParsedOutput,
    parse_deepseek_vl2,
    parse_qwen2_vl,
    parse_qwen3_vl,
    parse_qwen_json,
    parse_qwen_vl,
)


@dataclass(frozen=True)
class Dialect:
    name: str
    parse: Callable[..., ParsedOutput]
    """``parse(text, keys=None)``: every box and point of an answer, in the model's frame
    (``keys``: grounding.parsing.Keys a user's prompt imposed)."""
    coords: Literal["absolute", "relative"]
    """``absolute``: pixels of the model's input frame; ``relative``: 0..``norm`` of it."""
    norm: float | None = None
    factor: int | None = None
    """Model input sides are multiples of this (patch size x spatial merge)."""
    min_pixels: int | None = None
    max_pixels: int | None = None
    """The processor's own pixel limits, the frame used when the caller gives none."""
    fixed_size: tuple[int, int] | None = None
    """Models that resize every image to one size (Qwen-VL: 448x448)."""
    budget: tuple[int, int] | None = None
    """grounding's default (min_pixels, max_pixels) when running the model; see README."""
    one_reference: bool = False
    """The model grounds one referring expression per prompt (its prompt wraps one phrase
    in reference tokens): a class list is asked one class per request."""

    @property
    def is_relative(self) -> bool:
        return self.coords == "relative"


DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        # Budgets: the Qwen2/2.5-VL README suggests 256-1280 visual tokens "to balance
        # performance and cost"; the Qwen3-VL grounding cookbook runs 64-9800 tokens of 32px.
        Dialect("qwen2.5-vl", parse_qwen_json, "absolute", factor=28,
                min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28,
                budget=(256 * 28 * 28, 1280 * 28 * 28)),
        Dialect("qwen3-vl", parse_qwen3_vl, "relative", norm=1000, factor=32,
                min_pixels=64 * 32 * 32, max_pixels=16384 * 32 * 32,
                budget=(64 * 32 * 32, 9800 * 32 * 32)),
        # Qwen2-VL, Qwen-VL and DeepSeek-VL2 ground what their reference tokens wrap:
        # "<|ref|>person, car<|/ref|>" is read as one thing to find.
        Dialect("qwen2-vl", parse_qwen2_vl, "relative", norm=1000, factor=28,
                min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28,
                budget=(256 * 28 * 28, 1280 * 28 * 28), one_reference=True),
        Dialect("qwen-vl", parse_qwen_vl, "relative", norm=1000, fixed_size=(448, 448),
                one_reference=True),
        Dialect("deepseek-vl2", parse_deepseek_vl2, "relative", norm=999,
                one_reference=True),
    )
}

_ALIASES = {
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen25-vl": "qwen2.5-vl",
    "qwen25vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl",
    "qwen2_vl": "qwen2-vl",
    "qwen": "qwen-vl",
    "deepseek_vl_v2": "deepseek-vl2",
    "deepseek-vl-2": "deepseek-vl2",
    "deepseek_vl2": "deepseek-vl2",
}


def get_dialect(name: str | Dialect) -> Dialect:
    """Look a dialect up by name, alias or transformers ``model_type``."""
    if isinstance(name, Dialect):
        return name
    key = name.strip().lower()
    key = _ALIASES.get(key, _ALIASES.get(key.replace(".", "_"), key))
    try:
        return DIALECTS[key]
    except KeyError:
        known = ", ".join(DIALECTS)
        raise ValueError(f"unknown dialect {name!r}; known dialects: {known}") from None


def guess_dialect(model: str) -> Dialect | None:
    """The dialect a served model name suggests ("Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3-vl-235b-a22b-instruct", "deepseek-vl2-small"), or None."""
    name = model.lower().replace("_", "-").replace(" ", "-")
    for needle, dialect in (("qwen3-vl", "qwen3-vl"), ("qwen2.5-vl", "qwen2.5-vl"),
                            ("qwen2-5-vl", "qwen2.5-vl"), ("qwen25-vl", "qwen2.5-vl"),
                            ("qwen2-vl", "qwen2-vl"), ("deepseek-vl2", "deepseek-vl2"),
                            ("deepseek-vl-2", "deepseek-vl2"), ("qwen-vl", "qwen-vl")):
        if needle in name:
            return DIALECTS[dialect]
    return None


def parse(text: str, dialect: str | Dialect, keys: Keys | None = None) -> ParsedOutput:
    """Read every box and point out of a model answer, in the model's frame (``keys``:
    the JSON keys a user's prompt imposed; None lets the parser's rule find them)."""
    return get_dialect(dialect).parse(text, keys)
