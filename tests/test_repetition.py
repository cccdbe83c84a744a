"""Runaway repetition (grounding.core.repetition): the text rule on constructed answers
of each syntax and on every real answer, the token rule equal to it, the local backend's
stop on the tiny checkpoint with a forced repeating output, and the server's flag."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.backends.base import Request
from grounding.backends.local import LocalBackend
from grounding.backends.options import BackendOptions, LocalOptions, RemoteOptions
from grounding.backends.remote.client import OpenAIBackend
from grounding.backends.remote.codec import read_generation
from grounding.core.repetition import (
    DEFAULT_MIN_UNIT_CHARS,
    DEFAULT_MIN_UNIT_TOKENS,
    DEFAULT_REPEATS,
    DIGITS,
    IGNORED_TAIL,
    Repetition,
    repeating_ids,
    repeating_tail,
)
from grounding.parsing import parse_deepseek_vl2, parse_qwen_json
from grounding.testing import tiny_checkpoint
from grounding.testing.loopback import LoopbackServer, completion, fixed_handler
from tests.real_outputs import all_names, raw_text

ORD_DIGITS = frozenset(ord(d) for d in DIGITS)


def box_line(box, label="cake", indent="    "):
    return f'{indent}{{"bbox_2d": [{box[0]}, {box[1]}, {box[2]}, {box[3]}], "label": "{label}"}},\n'


def distinct_boxes(n):
    return [(7 * i, 3 * i + 1, 7 * i + 40, 3 * i + 61) for i in range(n)]


def qwen_answer(lines, closed=True):
    return "```json\n[\n" + "".join(lines) + ("]\n```" if closed else "")


# --------------------------------------------------------------------- the text rule


def test_a_qwen_answer_repeating_its_last_line_until_cut_mid_copy():
    head = [box_line(b, "cup") for b in distinct_boxes(5)]
    loop = box_line((139, 768, 315, 954), "small cake")
    text = qwen_answer([*head, *[loop] * 30], closed=False)
    text = text[:-len(loop) // 2]  # the token limit cut the 30th copy in half
    found = repeating_tail(text)
    assert found is not None
    assert found.unit == len(loop) and found.copies >= 29
    tail = text[found.start:]
    assert tail[found.unit:] == tail[:-found.unit]  # periodic from its start to the end
    # Everything written before the loop lies before it; from there on, only copies.
    before = text[:found.start]
    assert all(f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]" in before for b in distinct_boxes(5))
    assert "139, 768" not in before and "cup" not in text[found.start:]
    assert text[:found.start + 2 * found.unit].count(loop) >= 1
    # The parser still reads the objects before it (the copies are duplicates).
    labels = [o.label for o in parse_qwen_json(text).objects]
    assert labels[:5] == ["cup"] * 5 and set(labels[5:]) == {"small cake"}


def test_a_deepseek_answer_repeating_a_ref():
    head = "".join(f"<|ref|>person<|/ref|><|det|>[[{10 * i}, 20, {10 * i + 50}, 300]]<|/det|>\n"
                   for i in range(3))
    loop = "<|ref|>car<|/ref|><|det|>[[412, 500, 630, 777]]<|/det|>\n"
    text = head + loop * 12 + loop[:17]
    found = repeating_tail(text)
    assert found is not None and found.unit == len(loop) and found.copies >= 12
    assert "car" not in text[:found.start] and "person" not in text[found.start:]
    labels = [o.label for o in parse_deepseek_vl2(text).objects]
    assert labels[:4] == ["person"] * 3 + ["car"] and set(labels[4:]) == {"car"}
    # One ref with many different boxes is a real answer.
    boxes = ", ".join(f"[{5 * i}, {9 * i}, {5 * i + 30}, {9 * i + 40}]" for i in range(40))
    assert repeating_tail(f"<|ref|>person<|/ref|><|det|>[{boxes}]<|/det|>") is None


def test_many_different_boxes_are_never_flagged_at_any_point():
    """A long legitimate answer, closed or cut by the limit, and every prefix of it (what
    a per-step check sees as it is written)."""
    text = qwen_answer([box_line(b) for b in distinct_boxes(80)])
    assert repeating_tail(text) is None
    assert repeating_tail(text[:len(text) * 2 // 3]) is None
    ids = [ord(c) for c in text]
    assert not any(repeating_ids(ids[:n], min_unit=DEFAULT_MIN_UNIT_TOKENS, digits=ORD_DIGITS)
                   for n in range(1, len(ids) + 1))


def test_k_copies_are_needed():
    line = box_line((12, 34, 56, 78))
    assert DEFAULT_REPEATS == 4
    for closed in (True, False):
        assert repeating_tail(qwen_answer([line] * 3, closed)) is None
        assert repeating_tail(qwen_answer([line] * 3, closed), repeats=3) is not None
        found = repeating_tail(qwen_answer([line] * 4, closed))
        assert found is not None and found.copies == 4  # closed after its loop: still flagged
    assert repeating_tail(qwen_answer([line] * 40), repeats=0) is None
    with pytest.raises(ValueError, match="at least 2"):
        repeating_tail("x", repeats=1)


def test_alternating_objects_repeat_as_one_unit():
    a, b = box_line((12, 34, 56, 78), "cat"), box_line((90, 91, 92, 93), "dog")
    found = repeating_tail(qwen_answer([box_line((1, 2, 3, 4))] + [a, b] * 4, closed=False))
    assert found is not None and found.unit == len(a) + len(b) and found.copies == 4
    assert repeating_tail(qwen_answer([a, b] * 3 + [a], closed=False)) is None


def test_text_without_digits_and_short_runs_are_not_objects():
    # The empty cells of a QwenVL-HTML table repeat legitimately.
    html = '<table data-bbox="1 2 300 400"><tr>' + "<td></td>" * 60
    assert repeating_tail(html) is None
    # Prose repeating itself is no object loop either.
    assert repeating_tail("I cannot tell. " * 20) is None
    # One character over and over is (k copies of the shortest unit), and so is whitespace.
    run = DEFAULT_REPEATS * DEFAULT_MIN_UNIT_CHARS
    assert repeating_tail("[" + "!" * (run - 1)) is None
    assert repeating_tail("[" + "!" * run) == Repetition(start=1, unit=1, copies=run)
    assert repeating_tail('[{"bbox_2d": [1, 2, 3, 4]' + "\n" * 500) is not None
    # A short unit with a digit is caught a few copies later, as a multiple of itself.
    found = repeating_tail("Coordinates: " + "0, " * 40)
    assert found is not None and found.unit % 3 == 0 and found.unit >= DEFAULT_MIN_UNIT_CHARS


# The two real answers that are runaway loops: a stripped Qwen2-VL box repeated until the
# token limit, and a DeepSeek-VL2 det run degenerating into a run of 9s.
REAL_LOOPS = {"qwen2vl_stripped_tokens_repeated_box_cutoff.txt",
              "deepseekvl2_role_prefix_unclosed_det_9999_loop.txt"}


@pytest.mark.parametrize("name", all_names())
def test_no_real_answer_is_flagged(name):
    """The real answers of tests/fixtures/real_outputs: never flagged, and no prefix of
    them is either, with characters standing in for tokens (finer than any tokenizer, so
    at least as quick to see a loop) -- except the two real loops, which are."""
    text = raw_text(name)
    ids = [ord(c) for c in text]
    if name in REAL_LOOPS:
        # What a server's answer is checked with, and what a local run is stopped by.
        assert repeating_tail(text) is not None
        assert repeating_ids(ids, min_unit=DEFAULT_MIN_UNIT_TOKENS, max_unit=None,
                             digits=ORD_DIGITS)
        return
    assert repeating_tail(text) is None
    flagged = [n for n in range(1, len(ids) + 1)
               if repeating_ids(ids[:n], min_unit=DEFAULT_MIN_UNIT_TOKENS, max_unit=None,
                                digits=ORD_DIGITS)]
    assert flagged == []


def test_a_long_answer_is_checked_fast():
    import time

    legit = qwen_answer([box_line(b) for b in distinct_boxes(180)])  # about 10k characters
    loop = qwen_answer([box_line((5, 5, 9, 9))] * 160, closed=False)
    assert len(legit) > 9000
    started = time.perf_counter()
    for _ in range(20):
        assert repeating_tail(legit) is None
        assert repeating_tail(loop) is not None
    assert (time.perf_counter() - started) / 20 < 0.02


# --------------------------------------------------------------------- the token rule


def _random_case(rng: random.Random) -> str:
    alphabet = rng.choice(["ab", "ab1", "abc01", "x9"])
    unit = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
    head = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    copies = rng.randint(1, 8)
    cut = rng.randint(0, len(unit) - 1)
    return head + unit * copies + unit[:cut]


@pytest.mark.parametrize("min_unit", [1, 5, DEFAULT_MIN_UNIT_TOKENS])
@pytest.mark.parametrize("repeats", [2, 3, DEFAULT_REPEATS])
def test_the_token_rule_is_the_text_rule(min_unit, repeats):
    """Characters as token ids: the same answer, at the same place, for texts with
    nothing to ignore at their end."""
    rng = random.Random(f"{min_unit}-{repeats}")
    seen = set()
    for _ in range(400):
        text = _random_case(rng)
        if text.endswith(tuple(IGNORED_TAIL)):
            continue
        expected = repeating_tail(text, repeats=repeats, min_unit=min_unit)
        ids = [ord(c) for c in text]
        assert repeating_ids(ids, repeats=repeats, min_unit=min_unit, max_unit=None,
                             digits=ORD_DIGITS) == expected, text
        assert repeating_ids(torch.tensor(ids), repeats=repeats, min_unit=min_unit,
                             max_unit=None, digits=ORD_DIGITS) == expected
        seen.add(expected is None)
    assert seen == {True, False}


def test_the_token_rule_on_simple_sequences():
    unit = [5, 1, 7, 9, 2, 3, 4, 8, 6, 1, 0, 11]  # 12 ids, id 1 a "digit"
    digits = {1}
    assert repeating_ids([99] + unit * 3, digits=digits) is None
    assert repeating_ids([99] + unit * 4, digits=digits) == Repetition(1, 12, 4)
    assert repeating_ids([99] + unit * 4 + unit[:5], digits=digits) == Repetition(1, 12, 4)
    assert repeating_ids([99] + unit * 4, digits={42}) is None  # no digit in the unit
    assert repeating_ids([99] + unit * 4, digits=None) is not None  # every unit counts
    assert repeating_ids(unit * 4, max_unit=11, digits=digits) is None  # too long a unit
    run = DEFAULT_REPEATS * DEFAULT_MIN_UNIT_TOKENS
    assert repeating_ids([3] + [7] * (run - 1), digits=digits) is None
    assert repeating_ids([3] + [7] * run, digits=digits) == Repetition(1, 1, run)


def test_the_token_check_costs_microseconds_per_step():
    import time

    rng = random.Random(0)
    ids = [rng.randrange(200) for _ in range(2048)]
    started = time.perf_counter()
    for n in range(1, len(ids) + 1):
        assert repeating_ids(ids[:n]) is None
    assert (time.perf_counter() - started) / len(ids) < 5e-4  # measured: ~30 us


# ------------------------------------------------------------- the local backend's stop

PREFIX = '```json\n[\n    {"bbox_2d": [5, 6, 70, 80], "label": "dog"},\n'
UNIT = '    {"bbox_2d": [12, 34, 56, 78], "label": "cat"},\n'
LIMIT = 400


@pytest.fixture(scope="module")
def backend():
    return LocalBackend(str(tiny_checkpoint("qwen2.5-vl")), max_new_tokens=LIMIT)


def noise(seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (60, 80, 3), np.uint8))


def encode(backend, text):
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert backend.tokenizer.decode(ids) == text
    return ids


@contextlib.contextmanager
def forced(backend, rows: dict[int, list[int]], cycle_from: dict[int, int] | None = None):
    """A test-only hook on the language-model head: each step, row ``b`` of ``rows``
    writes the next id of ``rows[b]`` (from ``cycle_from[b]`` on, the ids cycle): its
    logits are overwritten so that greedy decoding picks exactly that id."""
    step = [0]
    cycle_from = cycle_from or {}

    def hook(module, args, output):
        s = step[0]
        step[0] += 1
        for b, ids in rows.items():
            start = cycle_from.get(b)
            if s < len(ids):
                i = s
            else:  # cycle, or stay on the last id (an end of sequence: padding follows)
                i = len(ids) - 1 if start is None else start + (s - start) % (len(ids) - start)
            output[b, -1, :] = -20.0
            output[b, -1, ids[i]] = 20.0
        return output

    handle = backend.net.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def repeating(backend):
    """The forced answer (its prefix, then the unit cycling) and the number of ids after
    which the token rule first sees k copies."""
    prefix, unit = encode(backend, PREFIX), encode(backend, UNIT)
    ids = prefix + unit * (LIMIT // len(unit) + 1)
    stop = next(n for n in range(1, len(ids))
                if repeating_ids(ids[:n], repeats=DEFAULT_REPEATS, digits=backend.digit_ids))
    return prefix, unit, ids, stop


def test_a_repeating_row_is_stopped_after_k_copies(backend):
    prefix, unit, ids, stop = repeating(backend)
    assert backend.stop_repeats == DEFAULT_REPEATS
    # k copies (the repetition may begin in the prefix's last tokens, which end as a copy).
    assert DEFAULT_REPEATS * len(unit) <= stop <= len(prefix) + DEFAULT_REPEATS * len(unit)
    with forced(backend, {0: ids}, {0: len(prefix)}):
        [gen] = backend.generate([Request(noise(), "Find cats")])
    assert gen.repetition and not gen.truncated
    assert len(gen.tokens) == len(gen.token_logprobs) == len(gen.top_logprobs) == stop
    assert gen.text == backend.tokenizer.decode(ids[:stop])
    assert gen.text.startswith(PREFIX) and gen.text.count(UNIT) == DEFAULT_REPEATS - 1
    assert repeating_tail(gen.text) is not None  # the text rule agrees
    assert [o.label for o in parse_qwen_json(gen.text).objects][:2] == ["dog", "cat"]


def test_without_the_stop_the_row_runs_to_the_limit(backend, monkeypatch):
    prefix, _, ids, _ = repeating(backend)
    monkeypatch.setattr(backend, "stop_repeats", 0)
    with forced(backend, {0: ids}, {0: len(prefix)}):
        [gen] = backend.generate([Request(noise(), "Find cats")])
    assert len(gen.tokens) == LIMIT and gen.truncated and not gen.repetition
    assert gen.text == backend.tokenizer.decode(ids[:LIMIT])


def test_only_the_repeating_row_stops_in_a_batch(backend):
    """Row 0 loops and stops; row 1 (the model's own output) runs on as it does alone."""
    prefix, _, ids, stop = repeating(backend)
    other = Request(noise(seed=3), "Find dogs", max_new_tokens=stop + 60)
    [alone] = backend.generate([other])
    with forced(backend, {0: ids}, {0: len(prefix)}):
        looping, batched = backend.generate([Request(noise(), "Find cats"), other])
    assert looping.repetition and len(looping.tokens) == stop
    assert looping.text == backend.tokenizer.decode(ids[:stop])
    assert batched.text == alone.text and batched.tokens == alone.tokens
    assert (batched.repetition, batched.truncated) == (alone.repetition, alone.truncated)
    assert len(batched.tokens) > stop  # it went on after row 0 stopped
    np.testing.assert_allclose(batched.token_logprobs, alone.token_logprobs, atol=1e-4)


def test_a_stopped_row_without_padding_is_cut_at_its_stop(backend, monkeypatch):
    """Without an end-of-sequence criterion transformers does not pad a stopped row: it
    goes on writing; what it wrote up to the stop is still all that is read."""
    prefix, _, ids, stop = repeating(backend)
    monkeypatch.setattr(backend.net.generation_config, "eos_token_id", None)
    monkeypatch.setattr(backend, "eos_ids", set())
    longer = Request(noise(seed=5), "Find dogs", max_new_tokens=stop + 30)
    with forced(backend, {0: ids}, {0: len(prefix)}):
        looping, other = backend.generate([Request(noise(), "Find cats"), longer])
    assert looping.repetition and not looping.truncated
    assert looping.text == backend.tokenizer.decode(ids[:stop])
    assert len(other.tokens) == stop + 30 and other.truncated


def test_a_finished_rows_padding_is_no_repetition(backend):
    """A row that ended (end-of-sequence, then padding while another row runs on) is not
    checked any more: its padding, one id over and over, is not a loop of its own."""
    prefix, _, ids, stop = repeating(backend)
    eos = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert backend.pad_id != eos  # the tiny checkpoint pads with another token
    short = [*encode(backend, '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```'), eos]
    with forced(backend, {0: short, 1: ids}, {1: len(prefix)}):
        ended, looping = backend.generate([Request(noise(), "Find a"),
                                           Request(noise(seed=1), "Find cats")])
    assert stop > len(short) + DEFAULT_REPEATS * DEFAULT_MIN_UNIT_TOKENS  # long enough padding
    assert not ended.repetition and not ended.truncated
    assert len(ended.tokens) == len(short) - 1 and ended.text.endswith("```")
    assert looping.repetition and len(looping.tokens) == stop


# ------------------------------------------------------------------------ the server


def runaway_answer() -> str:
    head = [box_line(b, "cup", "\t") for b in distinct_boxes(3)]
    return qwen_answer([*head, *[box_line((40, 41, 300, 310), "cup", "\t")] * 25],
                       closed=False)[:-9]


def test_read_generation_flags_a_repeating_answer():
    body = completion(runaway_answer(), finish_reason="length")
    import json

    gen = read_generation(json.dumps(body), (640, 480))
    assert gen.repetition and gen.truncated
    assert not read_generation(json.dumps(body), (640, 480), repeats=0).repetition
    normal = completion(qwen_answer([box_line(b) for b in distinct_boxes(30)]))
    assert not read_generation(json.dumps(normal), (640, 480)).repetition


@pytest.mark.parametrize(("answer", "finish", "flagged"), [
    (runaway_answer(), "length", True),
    (qwen_answer([box_line(b) for b in distinct_boxes(12)]), "stop", False),
])
def test_the_server_backend_flags_a_repeating_answer(answer, finish, flagged):
    with LoopbackServer(handler=fixed_handler(answer, finish_reason=finish)) as server:
        backend = OpenAIBackend("loopback-model", base_url=server.base_url,
                                dialect="qwen2.5-vl", timeout=10.0)
        off = OpenAIBackend("loopback-model", base_url=server.base_url,
                            dialect="qwen2.5-vl", timeout=10.0, stop_repeats=0)
        try:
            [gen] = backend.generate([Request(noise(), "Find cups")])
            [unflagged] = off.generate([Request(noise(), "Find cups")])
        finally:
            backend.close()
            off.close()
    assert gen.text == answer
    assert gen.repetition is flagged and gen.truncated is flagged
    assert not unflagged.repetition


# ----------------------------------------------------------------------- the setting


def test_one_default_for_the_setting():
    assert BackendOptions.stop_repeats == LocalOptions.stop_repeats == DEFAULT_REPEATS
    assert RemoteOptions.stop_repeats == DEFAULT_REPEATS
    field = BackendOptions.__dataclass_fields__["stop_repeats"]
    assert field.metadata["labels"] and field.metadata["missing"] == 0
    assert field.metadata["cli"] == "backend" and field.metadata["min"] == 0


@pytest.mark.parametrize("value", [1, 2, -1])
def test_one_copy_or_a_duplicate_is_no_loop(value):
    """1 copy is no repetition; 2 identical lines are a duplicate real answers write."""
    with pytest.raises(ValueError, match=r"stop-repeats must be 0 .off. or at least 3"):
        OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", dialect="qwen2.5-vl",
                      stop_repeats=value)
    with pytest.raises(ValueError, match=r"stop-repeats must be 0 .off. or at least 3"):
        LocalBackend(str(tiny_checkpoint("qwen2.5-vl")), stop_repeats=value)
