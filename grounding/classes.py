"""Map the free text a model writes as a label onto the user's class list."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


def _singular(word: str) -> str:
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("sses", "ss"), ("xes", "x"),
                         ("ches", "ch"), ("shes", "sh"), ("oes", "o"), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 1 and not word.endswith("ss"):
            return word[: -len(suffix)] + repl
    return word


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def _singular_phrase(text: str) -> str:
    words = _norm(text).split()
    return " ".join([*words[:-1], _singular(words[-1])]) if words else ""


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
        else:
            self.names = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
            phrases = {n: n for n in self.names}
        if not self.names:
            raise ValueError("the class list is empty")
        self.cutoff = cutoff
        self._ids = {n: i for i, n in enumerate(self.names)}
        self._exact = {p: self._ids[c] for p, c in phrases.items()}
        self._lower = {_norm(p): self._ids[c] for p, c in phrases.items()}
        self._singular = {_singular_phrase(p): self._ids[c] for p, c in phrases.items()}

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
        singular = _singular_phrase(label)
        if singular in self._singular:
            return self._singular[singular]
        close = difflib.get_close_matches(lowered, list(self._lower), n=1, cutoff=self.cutoff)
        return self._lower[close[0]] if close else None
