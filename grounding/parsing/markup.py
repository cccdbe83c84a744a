"""The non-JSON ways Qwen2.5-VL writes locations: XML points, QwenVL-HTML ``data-bbox``
attributes, and the plain-text ``x1,y1,x2,y2 label`` lines a system prompt can ask for."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from grounding.parsing.fields import NUMBER
from grounding.parsing.types import ParsedOutput, RawObject

_POINTS_TAG = re.compile(r"<(points?)\b([^>]*)>(.*?)</\1\s*>", re.S | re.I)
_ATTR = re.compile(r"""([\w:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_COORD_ATTR = re.compile(r"^([xy])(\d*)$", re.I)
_OPEN_POINTS_AT_END = re.compile(r"<points?\b[^>]*>?[^<]*$", re.I)


def parse_xml_points(text: str) -> ParsedOutput:
    """``<points x1="" y1="" x2="" y2="" alt="">phrase</points>``; each xN/yN pair is a point."""
    objects: list[RawObject] = []
    invalid = 0
    for m in _POINTS_TAG.finditer(text):
        attrs = {a.group(1): a.group(2) if a.group(2) is not None else a.group(3)
                 for a in _ATTR.finditer(m.group(2))}
        xs: dict[str, float] = {}
        ys: dict[str, float] = {}
        extra: dict[str, str] = {}
        for name, value in attrs.items():
            coord = _COORD_ATTR.match(name)
            if coord:
                try:
                    (xs if coord.group(1).lower() == "x" else ys)[coord.group(2)] = float(value)
                except ValueError:
                    invalid += 1
            else:
                extra[name] = value
        phrase = m.group(3).strip() or extra.get("alt") or None
        if set(xs) != set(ys) or not xs:
            invalid += 1
            continue
        for index in sorted(xs, key=lambda s: int(s) if s else 0):
            objects.append(RawObject("point", (xs[index], ys[index]), phrase, dict(extra),
                                     start=m.start()))
    truncated = bool(_OPEN_POINTS_AT_END.search(text))
    return ParsedOutput(tuple(objects), truncated=truncated, invalid=invalid)


class _BBoxHTML(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[dict] = []  # in document order
        self.open: list[dict] = []
        self.invalid = 0

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], void: bool) -> None:
        values = dict(attrs)
        box = values.get("data-bbox")
        if box is None:
            return
        coords = [float(n) for n in NUMBER.findall(box)]
        if len(coords) != 4:
            self.invalid += 1
            return
        line, col = self.getpos()
        item = {"tag": tag, "coords": coords, "label": values.get("class") or tag,
                "text": [], "pos": (line, col)}
        self.found.append(item)
        if not void:
            self.open.append(item)

    def handle_starttag(self, tag, attrs):
        self._start(tag, attrs, void=tag in {"img", "br", "hr", "input", "meta"})

    def handle_startendtag(self, tag, attrs):
        self._start(tag, attrs, void=True)

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i]["tag"] == tag:
                del self.open[i:]
                break

    def handle_data(self, data):
        for item in self.open:
            item["text"].append(data)


def parse_html_bboxes(text: str) -> ParsedOutput:
    """QwenVL-HTML: every element with ``data-bbox="x1 y1 x2 y2"`` is one box.

    The label is the element's class (``image``, ``formula``...) or else its tag; the
    element's text and tag go to attributes, so document layouts keep their content.
    """
    if "data-bbox" not in text:
        return ParsedOutput()
    parser = _BBoxHTML()
    parser.feed(text)
    parser.close()
    line_offsets = [0]
    for line in text.splitlines(keepends=True):
        line_offsets.append(line_offsets[-1] + len(line))
    objects = []
    for item in parser.found:
        attributes = {"tag": item["tag"]}
        content = " ".join("".join(item["text"]).split())
        if content:
            attributes["text"] = content
        line, col = item["pos"]
        objects.append(RawObject("box", tuple(item["coords"]), item["label"], attributes,
                                 start=line_offsets[line - 1] + col))
    tail = text[text.rfind(">") + 1 :] if ">" in text else text
    return ParsedOutput(tuple(objects), truncated="<" in tail, invalid=parser.invalid)


_PLAIN_LINE = re.compile(
    r"^[ \t]*(?P<c>(?:[-+]?\d+(?:\.\d+)?[ \t]*,[ \t]*){3}[-+]?\d+(?:\.\d+)?)"
    r"[ \t]+(?P<label>\S[^\n]*?)[ \t]*$",
    re.M,
)


def parse_plain_lines(text: str) -> ParsedOutput:
    """Lines ``x1,y1,x2,y2 label``, the format of the Qwen2.5-VL cookbook's plain-text prompt."""
    objects = [
        RawObject("box", tuple(float(n) for n in m.group("c").split(",")), m.group("label"),
                  {}, start=m.start())
        for m in _PLAIN_LINE.finditer(text)
    ]
    return ParsedOutput(tuple(objects))
