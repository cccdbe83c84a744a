"""What a parser reads out of model text, still in the model's coordinate frame."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

Kind = Literal["box", "point"]


@dataclass(frozen=True)
class RawObject:
    """One box or point exactly as the model wrote it (model frame, corners as written)."""

    kind: Kind
    coords: tuple[float, ...]
    label: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    start: int = 0
    """Offset of the object in the text, so objects from different syntaxes keep text order."""


_new = object.__new__
_set = object.__setattr__


def raw_object(kind: Kind, coords: tuple[float, ...], label: str | None,
               attributes: dict[str, Any], start: int) -> RawObject:
    """``RawObject(kind, coords, label, attributes, start)``, the same object in about
    half the time: a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, this sets them all at once. For the parsers' per-object
    loops; it takes every field, so nothing is left to a default."""
    obj = _new(RawObject)
    _set(obj, "__dict__", {"kind": kind, "coords": coords, "label": label,
                           "attributes": attributes, "start": start})
    return obj


if [f.name for f in fields(RawObject)] != ["kind", "coords", "label", "attributes", "start"]:
    raise AssertionError("RawObject's fields changed: give raw_object every field")


@dataclass(frozen=True)
class ParsedOutput:
    """Every object found in one model answer.

    ``truncated`` says the text stops inside a structure (an unclosed bracket, string or
    tag): the answer was cut off and objects after the cut are missing. ``invalid`` counts
    objects that were complete but unusable (e.g. a ``bbox_2d`` with three numbers).
    """

    objects: tuple[RawObject, ...] = ()
    truncated: bool = False
    invalid: int = 0

    @property
    def boxes(self) -> list[RawObject]:
        return [o for o in self.objects if o.kind == "box"]

    @property
    def points(self) -> list[RawObject]:
        return [o for o in self.objects if o.kind == "point"]

    def __add__(self, other: ParsedOutput) -> ParsedOutput:
        merged = sorted((*self.objects, *other.objects), key=lambda o: o.start)
        return ParsedOutput(
            objects=tuple(merged),
            truncated=self.truncated or other.truncated,
            invalid=self.invalid + other.invalid,
        )


@dataclass(frozen=True)
class Keys:
    """The keys a user's own prompt imposed on the answer (``--box-key``, ``--point-key``,
    ``--label-key``): where the parser reads a box, a point and the label when its own
    rule would guess wrong. None: the parser's rule decides."""

    box: str | None = None
    point: str | None = None
    label: str | None = None

    def __bool__(self) -> bool:
        return any((self.box, self.point, self.label))

    def to_dict(self) -> dict[str, str] | None:
        """As run.json records it: the keys given, None when none was."""
        given = {k: v for k, v in (("box", self.box), ("point", self.point),
                                   ("label", self.label)) if v}
        return given or None
