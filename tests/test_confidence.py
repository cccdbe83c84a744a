"""Scores come from the model's own log-probabilities and land on the right object."""

from __future__ import annotations

import math
import re

import pytest

from grounding import parse, result_from_text
from grounding.backends.remote.client import OpenAIBackend
from grounding.core.assemble import build_result
from grounding.core.confidence import locate, score_objects, token_spans
from grounding.pipeline.detector import Detector
from grounding.testing.loopback import LoopbackServer, grounding_handler, token_logprob, tokenize
from tests.real_outputs import all_names, raw_text

# Digits one per token, as the Qwen tokenizers split them.
TOKEN = re.compile(r"\d|[A-Za-z]+|\s+|[^\w\s]")


def tokens_of(text):
    return TOKEN.findall(text)


# The token forms open an object where its reference phrase (or, without one, its box)
# begins; a reference that no box follows (an echoed prompt) opens nothing.
_TOKEN_OBJECT = (r"<ref>(?=[^<]*</ref><box>)|(?<!</ref>)<box>"
                 r"|<\|object_ref_start\|>(?=[^<]*<\|object_ref_end\|><\|box_start\|>)"
                 r"|(?<!<\|object_ref_end\|>)(?<!: )<\|box_start\|>"
                 r"|<\|ref\|>(?=[^<]*<\|/ref\|><\|det\|>)|(?<!<\|/ref\|>)<\|det\|>"
                 r'|"object_name"')
# Tokens stripped by a server: the label glued to "(x1,y1),(x2,y2)".
_BARE_OBJECT = r"[^\s()<>,]*\(\d+,\d+\),\(\d+,\d+\)"


def logprobs_by_object(text, values, background=-9.0):
    """A log-probability per token: values[i] for every token of object i's text, found
    independently of grounding.core.confidence: from the `{` or `<` that opens the i-th
    coordinate key (or data-bbox), or from where the i-th reference/box token run (or a
    bare stripped box) begins, to where the next object's opens; background before."""
    starts = [max(text.rfind("{", 0, m.start()), text.rfind("<", 0, m.start()), 0)
              for m in re.finditer(r'bbox_2d|point_2d|data-bbox|"bboxes"|"coordinate"', text)]
    starts += [m.start() for m in re.finditer(_TOKEN_OBJECT, text)]
    if "<" not in text and "{" not in text:
        starts += [m.start() for m in re.finditer(_BARE_OBJECT, text)]
    starts = sorted(starts) or [0]
    tokens = tokens_of(text)
    out = []
    for a, _ in token_spans(text, tokens):
        owner = max((i for i, s in enumerate(starts) if s <= a), default=None)
        # an object the parser rightly drops (cut off) owns tokens no value is given for
        out.append(values[owner] if owner is not None and owner < len(values) else background)
    return tokens, out


TEXT = '```json\n[\n  {"bbox_2d": [10, 20, 30, 40], "label": "cat"},\n  {"bbox_2d": [50, 60, 70, 80], "label": "dog"}\n]\n```'


def test_score_is_the_geometric_mean_of_the_objects_token_probabilities():
    tokens = tokens_of(TEXT)
    lps = []
    for a, b in token_spans(TEXT, tokens):
        inside_first = TEXT.index("10") <= a < TEXT.index("40") + 2 or TEXT[a:b] == "cat"
        inside_second = TEXT.index("50") <= a < TEXT.index("80") + 2 or TEXT[a:b] == "dog"
        lps.append(-0.1 if inside_first else -2.0 if inside_second else -7.0)
    # within the first object the digit tokens are 1,0,2,0,3,0,4,0 and the label "cat",
    # interleaved separators ", " also fall inside the coordinate span
    objects = parse(TEXT, "qwen2.5-vl").objects
    s1, s2 = score_objects(TEXT, objects, tokens, lps)
    assert s1 == pytest.approx(math.exp(-0.1))
    assert s2 == pytest.approx(math.exp(-2.0))


def test_a_hesitant_digit_lowers_only_its_box():
    objects = parse(TEXT, "qwen2.5-vl").objects
    tokens = tokens_of(TEXT)
    lps = [-0.01] * len(tokens)
    spans = token_spans(TEXT, tokens)
    seven = TEXT.index("70")
    lps[next(i for i, (a, _) in enumerate(spans) if a == seven)] = -5.0  # the "7" of 70
    s1, s2 = score_objects(TEXT, objects, tokens, lps)
    assert s1 == pytest.approx(math.exp(-0.01))
    assert s2 < 0.8 * s1


# Each real answer is read in its own family's dialect (the file name's prefix).
FAMILY_DIALECT = {"qwenvl": "qwen-vl", "qwen2vl": "qwen2-vl", "qwen25vl": "qwen2.5-vl",
                  "qwen3vl": "qwen3-vl", "deepseekvl2": "deepseek-vl2"}


@pytest.mark.parametrize("name", all_names())
def test_scores_line_up_with_objects_on_real_outputs(name):
    dialect = FAMILY_DIALECT[name.split("_", 1)[0]]
    text = raw_text(name)
    objects = parse(text, dialect).objects
    values = [-0.05 * (i + 1) for i in range(len(objects))]
    tokens, lps = logprobs_by_object(text, values)
    scores = score_objects(text, objects, tokens, lps)
    assert all(s is not None for s in scores), name
    # Objects that look alike (same label, e.g. 12 "small cake") still get their own score.
    assert scores == pytest.approx([math.exp(v) for v in values], rel=1e-6)


def test_tokens_that_do_not_concatenate_still_align():
    # A byte-level tokenizer splits "é" into two tokens that decode to U+FFFD each.
    text = 'a {"bbox_2d": [1, 2, 3, 4], "label": "café"} b'
    head, tail = text.split("é")
    tokens = [*tokens_of(head), "\ufffd", "\ufffd", *tokens_of(tail)]
    spans = token_spans(text, tokens)
    assert len(spans) == len(tokens)
    last_quote = len(tokens) - 4  # the '"' that closes "café"
    assert text[slice(*spans[last_quote])] == '"'
    assert spans[-1] == (len(text) - 1, len(text))
    lps = [-0.2] * len(tokens)
    [score] = score_objects(text, parse(text, "qwen2.5-vl").objects, tokens, lps)
    assert score == pytest.approx(math.exp(-0.2))


def test_no_logprobs_no_scores():
    objects = parse(TEXT, "qwen2.5-vl").objects
    assert score_objects(TEXT, objects, None, None) == [None, None]
    assert score_objects(TEXT, objects, ["x"], [-1.0, -2.0]) == [None, None]


def test_min_score_drops_and_counts():
    parsed = parse(TEXT, "qwen2.5-vl")
    r = build_result(parsed, "qwen2.5-vl", image_size=(100, 100), input_size=(100, 100),
                     scores=[0.9, 0.2], min_score=0.5)
    assert [b.label for b in r.boxes] == ["cat"] and r.boxes[0].score == 0.9
    assert r.dropped == {"low_score": 1}
    unscored = build_result(parsed, "qwen2.5-vl", image_size=(100, 100), input_size=(100, 100),
                            scores=[None, None], min_score=0.5)
    assert len(unscored.boxes) == 2


def test_reference_dialects_score_label_before_coordinates():
    text = "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|ref|>dog<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>"
    objects = parse(text, "deepseek-vl2").objects
    regions = locate(text, objects)
    assert text[slice(*regions[0][1])] == "cat" and text[slice(*regions[1][1])] == "dog"
    assert text[slice(*regions[1][0])] == "5, 6, 7, 8"


def test_scores_from_a_server_that_returns_logprobs():
    import numpy as np
    from PIL import Image

    a = np.full((200, 300, 3), 90, np.uint8)
    a[40:120, 60:200] = (255, 0, 0)
    with LoopbackServer(handler=grounding_handler("qwen2.5-vl", label="box")) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, dialect="qwen2.5-vl")
        result = Detector(backend).detect(Image.fromarray(a), classes=["box"])
        backend.close()
    gen = result.generation
    assert gen.tokens == tokenize(gen.text)
    assert gen.token_logprobs == [token_logprob(i) for i in range(len(gen.tokens))]
    expected = score_objects(gen.text, parse(gen.text, "qwen2.5-vl").objects, gen.tokens,
                             gen.token_logprobs)
    assert [b.score for b in result.boxes] == expected and expected[0] is not None
    assert result.to_record()["detections"][0]["score"] == expected[0]


def test_result_from_text_stays_unscored():
    assert result_from_text(TEXT, "qwen2.5-vl").boxes[0].score is None
