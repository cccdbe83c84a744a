"""What to ask about each image: the classes or expression, boxes or points, and how
the image is asked about (one request, one per class, one per tile)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from grounding.backends.base import Request
from grounding.core.classes import ClassMap
from grounding.core.dialects import Dialect, get_dialect
from grounding.core.tiles import Tiling
from grounding.io.images import ImageSource, describe, load_image
from grounding.parsing import Keys
from grounding.pipeline.prompts import Task, class_prompt, expression_prompt, with_references

CLASS_FIELD = "{class}"
"""In a user's ``--prompt`` with ``--per-class``: where each class phrase goes."""


@dataclass(frozen=True)
class Ask:
    """One prompt sent about an image: ``phrase`` is the class phrase it asks for alone
    (one request per class), None when it asks for everything."""

    prompt: str
    phrase: str | None = None


@dataclass(frozen=True)
class Query:
    """What to look for: classes (or an ontology) or a referring expression, boxes or
    points; and how each image is asked about.

    ``per_class``: one request per class (each answer labelled with the class it asked
    for); None lets the dialect decide (models that ground one reference at a time:
    Qwen-VL, Qwen2-VL, DeepSeek-VL2). ``tiling``: ask about overlapping tiles of each
    image (grounding.core.tiles) instead of (``with_full``: as well as) the whole image.
    ``keys``: where the answers hold boxes, points and labels when the prompt named its
    own keys (grounding.parsing.Keys); None lets the parser's rule find them.
    """

    classes: ClassMap | None = None
    expression: str | None = None
    prompt: str | None = None
    task: Task = "boxes"
    system: str | None = None
    references: tuple[Image.Image, ...] = ()
    """Example images sent before each image (upright RGB): "find more like these"."""
    reference_names: tuple[str, ...] = ()
    per_class: bool | None = None
    tiling: Tiling | None = None
    keys: Keys | None = None

    @classmethod
    def make(cls, classes: Sequence[str] | Mapping[str, str] | str | None = None,
             prompt: str | None = None, *, points: bool = False,
             system: str | None = None, references: Sequence[ImageSource] = (),
             per_class: bool | None = None, tiling: Tiling | None = None,
             keys: Keys | None = None) -> Query:
        """A bad reference image raises ImageLoadError: it would spoil every request.
        ``per_class`` True with a prompt of one's own needs ``{class}`` in it (ValueError
        otherwise): that is where each class goes."""
        if classes is None and prompt is None:
            raise ValueError("give classes to find or a prompt")
        if isinstance(classes, str):
            class_map = ClassMap.parse(classes)
        elif classes is not None:
            class_map = classes if isinstance(classes, ClassMap) else ClassMap(classes)
        else:
            class_map = None
        if per_class and class_map is None:
            raise ValueError("per-class requests need classes (--classes or --ontology)")
        if per_class and prompt and CLASS_FIELD not in prompt:
            raise ValueError(f"per-class requests with a prompt of your own need "
                             f"{CLASS_FIELD} in it, where each class goes")
        loaded = tuple(load_image(r) for r in references)
        return cls(class_map, None, prompt, "points" if points else "boxes", system, loaded,
                   tuple(describe(r) for r in references), per_class, tiling,
                   keys or None)

    def asks_per_class(self, dialect: str | Dialect) -> bool:
        """Whether each class is asked for in its own request with ``dialect``: when
        asked to, else for a model that grounds one reference at a time (unless the
        user's own prompt has no ``{class}`` to put each class in)."""
        if self.classes is None:
            return False
        if self.per_class is not None:
            return self.per_class
        return get_dialect(dialect).one_reference and (
            not self.prompt or CLASS_FIELD in self.prompt)

    def text(self, dialect) -> str:
        """The prompt sent when the classes are asked for together: the user's own (its
        ``{class}`` replaced by the class phrases, comma-separated), else the dialect's
        built-in one (which, with reference images, says which image
        to answer about)."""
        if self.prompt and self.classes is not None:
            # {class} takes every class when they are asked for together.
            return self.prompt.replace(CLASS_FIELD, ", ".join(self.classes.prompt_phrases))
        if self.classes is not None:
            text = class_prompt(dialect, self.classes.prompt_phrases, self.task)
        else:
            assert self.prompt is not None
            text = expression_prompt(dialect, self.prompt, self.task)
        return with_references(text, len(self.references))

    def asks(self, dialect) -> list[Ask]:
        """Every prompt sent about one image (or tile): one, or one per class phrase."""
        if not self.asks_per_class(dialect):
            return [Ask(self.text(dialect))]
        assert self.classes is not None
        out = []
        for phrase in self.classes.prompt_phrases:
            if self.prompt:
                text = self.prompt.replace(CLASS_FIELD, phrase)
            else:
                text = with_references(class_prompt(dialect, [phrase], self.task),
                                       len(self.references))
            out.append(Ask(text, phrase))
        return out

    def recorded_prompt(self, dialect) -> str | list[str]:
        """The prompt as run.json records it: the one prompt, or each class's."""
        asks = self.asks(dialect)
        return asks[0].prompt if len(asks) == 1 and asks[0].phrase is None else [
            a.prompt for a in asks]

    def parse(self, dialect: Dialect, text: str):
        """An answer to this query read in ``dialect``, with the query's keys."""
        return dialect.parse(text, self.keys)

    def request(self, image: Image.Image, text: str) -> Request:
        return Request(image, text, self.system, self.task, references=self.references)
