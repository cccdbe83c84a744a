"""Map the free text a model writes as a label onto the user's class list."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child",
              "mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth",
              "knives": "knife", "leaves": "leaf", "wolves": "wolf", "sheep": "sheep"}
_SUFFIXES = (("ies", "y"), ("ves", "f"), ("es", ""), ("s", ""))


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def _forms(text: str) -> set[str]:
    """The phrase and its candidate singulars (last word only: "traffic lights")."""
    words = _norm(text).split()
    if not words:
        return set()
    head, last = words[:-1], words[-1]
    lasts = {last, _IRREGULAR.get(last, last)}
    for suffix, repl in _SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix) + 1 and not last.endswith("ss"):
            lasts.add(last[: -len(suffix)] + repl)
    return {" ".join([*head, w]) for w in lasts}


class ClassMap:
    """Class names in id order, plus prompt phrasings that mean each class.

    Matching order for a label: exact, case-insensitive, singular/plural, closest
    (difflib ratio >= ``cutoff``). A label that matches nothing gets ``None``.
    """

    def __init__(self, classes: Iterable[str] | Mapping[str, str], *, cutoff: float = 0.8):
        if isinstance(classes, Mapping):
            # ontology: prompt phrase -> class name (several phrases may share a class)
            self.names: list[str] = list(dict.fromkeys(classes.values()))
            phrases = {**{n: n for n in self.names}, **dict(classes)}
            self.prompt_phrases: list[str] = list(classes)
        else:
            self.names = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
            phrases = {n: n for n in self.names}
            self.prompt_phrases = list(self.names)
        if not self.names:
            raise ValueError("the class list is empty")
        self.cutoff = cutoff
        self._ids = {n: i for i, n in enumerate(self.names)}
        self._exact = {p: self._ids[c] for p, c in phrases.items()}
        self._lower = {_norm(p): self._ids[c] for p, c in phrases.items()}
        self._forms: dict[str, int] = {}
        for p, c in phrases.items():
            for form in _forms(p):
                self._forms.setdefault(form, self._ids[c])

    @classmethod
    def parse(cls, text: str) -> ClassMap:
        """From a comma-separated list, as the CLI's ``--classes`` takes it."""
        return cls([c for c in text.split(",")])

    def __len__(self) -> int:
        return len(self.names)

    def match(self, label: str | None) -> int | None:
        if not label:
            return None
        if label in self._exact:
            return self._exact[label]
        lowered = _norm(label)
        if lowered in self._lower:
            return self._lower[lowered]
        for form in sorted(_forms(label)):
            if form in self._forms:
                return self._forms[form]
        close = difflib.get_close_matches(lowered, list(self._lower), n=1, cutoff=self.cutoff)
        return self._lower[close[0]] if close else None
