"""Model frame <-> original image: properties of the resize rule, agreement with the real
processor's rule in transformers, and boxes/points mapped back within one model unit."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from qwen_vl_utils import smart_resize as qwen_vl_utils_smart_resize
from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
    smart_resize as transformers_smart_resize,
)

from grounding import (
    GeometryError,
    GroundingError,
    ParsedOutput,
    RawObject,
    build_result,
    get_dialect,
    model_frame,
    result_from_text,
)
from grounding.core.geometry import to_model_box

FIXTURES = Path(__file__).parent / "fixtures" / "real_outputs"

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

FACTORS = {"qwen2.5-vl": 28, "qwen3-vl": 32}


@st.composite
def image_sizes(draw, max_side: int = 6000, max_ratio: float = 150.0):
    """(width, height), 1..max_side each, long/short side ratio below ``max_ratio``."""
    w = draw(st.integers(1, max_side))
    lo = max(1, math.floor(w / max_ratio) + 1)
    hi = min(max_side, math.ceil(w * max_ratio) - 1)
    h = draw(st.integers(lo, max(lo, hi)))
    if max(w, h) / min(w, h) >= max_ratio:  # only when w is tiny and rounding bit
        h = w
    return (w, h) if draw(st.booleans()) else (h, w)


@st.composite
def pixel_budgets(draw, factor: int):
    """(min_pixels, max_pixels), min <= max: usually whole tokens (factor**2 pixels),
    sometimes any integer, from one token to the processors' 16384-token default."""
    if draw(st.booleans()):
        lo = draw(st.integers(1, 4096)) * factor * factor
        hi = draw(st.integers(lo // (factor * factor), 16384)) * factor * factor
    else:
        lo = draw(st.integers(1, 2_000_000))
        hi = draw(st.integers(lo, 16384 * factor * factor))
    return lo, hi


# --------------------------------------------------------------------------- the frame


@pytest.mark.parametrize("dialect", sorted(FACTORS))
@FAST
@given(data=st.data())
def test_frame_properties(dialect, data):
    f = FACTORS[dialect]
    w, h = data.draw(image_sizes())
    lo, hi = data.draw(pixel_budgets(f))
    try:
        fw, fh = model_frame(dialect, w, h, min_pixels=lo, max_pixels=hi)
    except GeometryError:
        event("refused")
        # Only refused when, at the image's aspect ratio, max_pixels cannot even hold a
        # short side of one factor. (1e-9 slack: qwen-vl-utils computes 4517 / (4517 / 28)
        # = 27.999999999999996 and floors it to 0, refusing a square at max_pixels = 28*28.)
        assert min(w, h) * math.sqrt(hi / (w * h)) < f * (1 + 1e-9)
        return
    # grounding delegates to qwen-vl-utils (the resize the cookbooks apply before the
    # processor), in (width, height) order.
    assert (fh, fw) == qwen_vl_utils_smart_resize(h, w, factor=f, min_pixels=lo, max_pixels=hi)

    # sides: whole multiples of the factor, at least one factor
    assert fw % f == 0 and fh % f == 0
    assert fw >= f and fh >= f

    # aspect ratio: one common scale s puts both sides within one factor of w*s, h*s
    # (round, floor or ceil to the factor loses less than a factor per side).
    s_lo = max((fw - f) / w, (fh - f) / h)
    s_hi = min((fw + f) / w, (fh + f) / h)
    assert s_lo <= s_hi + 1e-12, (w, h, fw, fh)
    if min(w, h) * s_hi >= 10 * f:  # both sides many factors long: aspect within ~25%
        assert abs(math.log((fw / fh) / (w / h))) < math.log(1.25)

    # pixel budget. qwen-vl-utils' rule: round each side to the factor; if that is over
    # max_pixels scale by sqrt(max/(w*h)) and *floor*, if under min_pixels scale by
    # sqrt(min/(w*h)) and *ceil*. So shrinking never overshoots max_pixels and enlarging
    # never undershoots min_pixels; the other bound holds whenever the window is wide
    # enough for one factor step of slack at the image's aspect ratio.
    px = fw * fh
    r = w / h
    if lo <= f * f:  # no enlarging can happen
        assert px <= hi
    enlarged_max = (math.sqrt(lo * r) + f) * (math.sqrt(lo / r) + f)
    if hi >= enlarged_max * (1 + 1e-9):
        event("max_pixels checked")
        assert px <= hi, (w, h, lo, hi, fw, fh)
    short_side_at_max = min(math.sqrt(hi * r), math.sqrt(hi / r))
    if short_side_at_max >= f:
        shrunk_min = (math.sqrt(hi * r) - f) * (math.sqrt(hi / r) - f)
        if lo <= shrunk_min * (1 - 1e-9):
            event("min_pixels checked")
            assert px >= lo, (w, h, lo, hi, fw, fh)
    rounded = max(f, round(w / f) * f) * max(f, round(h / f) * f)
    if rounded > hi:
        event("shrunk")
        assert px <= hi  # shrinking floors: never above max_pixels
    if rounded < lo:
        event("enlarged")
        assert px >= lo  # enlarging ceils: never below min_pixels


@pytest.mark.parametrize("dialect", sorted(FACTORS))
@FAST
@given(data=st.data())
def test_processor_leaves_the_frame_untouched(dialect, data):
    """transformers' processor resize (the rule inside Qwen2VLImageProcessor) applied to an
    image already at grounding's frame, with the same limits, is the identity: the model
    sees exactly the frame grounding computes.

    Holds whenever the frame's pixel count lies inside [min_pixels, max_pixels], i.e. always
    for the processors' defaults (second test below) and for any window with slack. With a
    window narrower than one factor step qwen-vl-utils can land outside it (see
    test_frame_properties) and the processor would then resize again; such frames are
    skipped here and pinned in test_tight_budget_is_not_idempotent. Frames whose aspect
    ratio passed 200 through rounding are refused by transformers altogether, pinned in
    test_frame_aspect_can_pass_200.
    """
    f = FACTORS[dialect]
    w, h = data.draw(image_sizes())
    lo, hi = data.draw(pixel_budgets(f))
    try:
        fw, fh = model_frame(dialect, w, h, min_pixels=lo, max_pixels=hi)
    except GeometryError:
        return
    if max(fw, fh) / min(fw, fh) > 200:
        event("frame aspect over 200")
        return  # transformers refuses such an image outright: test_frame_aspect_can_pass_200
    if lo <= fw * fh <= hi:
        event("inside the window")
        assert transformers_smart_resize(fh, fw, f, lo, hi) == (fh, fw)


@pytest.mark.parametrize("dialect", sorted(FACTORS))
@FAST
@given(size=image_sizes())
def test_default_budget_frame_is_within_limits_and_a_fixed_point(dialect, size):
    w, h = size
    d = get_dialect(dialect)
    fw, fh = model_frame(dialect, w, h)
    assert d.min_pixels <= fw * fh <= d.max_pixels
    if max(fw, fh) / min(fw, fh) > 200:
        return  # see test_frame_aspect_can_pass_200
    assert transformers_smart_resize(fh, fw, d.factor, d.min_pixels, d.max_pixels) == (fh, fw)


def test_tight_budget_is_not_idempotent():
    """Documented edge: a 1-token window. qwen-vl-utils floors 2095x1991 to 140x140 = 19600
    pixels, below min_pixels = 26 tokens (20384); transformers' rule would enlarge that
    again to 168x168. grounding reports the qwen-vl-utils frame."""
    lo, hi = 26 * 784, 28 * 784
    assert model_frame("qwen2.5-vl", 2095, 1991, min_pixels=lo, max_pixels=hi) == (140, 140)
    assert transformers_smart_resize(140, 140, 28, lo, hi) == (168, 168)


def test_frame_aspect_can_pass_200():
    """Documented edge (found by hypothesis): rounding a short side of 38 down to 28 turns a
    5615x38 original (aspect 148) into a 5628x28 frame (aspect 201). transformers computes
    the same frame from the original, but refuses to resize the resized image again, so a
    pipeline that resizes with qwen-vl-utils and then calls the processor fails on it."""
    assert model_frame("qwen2.5-vl", 5615, 38) == (5628, 28)
    assert transformers_smart_resize(38, 5615, 28, 3136, 16384 * 784) == (28, 5628)
    with pytest.raises(ValueError, match="aspect ratio"):
        transformers_smart_resize(28, 5628, 28, 3136, 16384 * 784)


ORDINARY_SIZES = [(640, 480), (1024, 1024), (870, 1398), (1920, 1080), (4032, 3024),
                  (300, 7000), (7000, 300), (1, 1), (13, 13), (28, 28), (40, 3000),
                  (3024, 4032), (5000, 5000), (100, 100), (56, 2000)]


@pytest.mark.parametrize("dialect", sorted(FACTORS))
@pytest.mark.parametrize("size", ORDINARY_SIZES)
def test_frame_equals_transformers_rule_on_ordinary_sizes(dialect, size):
    w, h = size
    d = get_dialect(dialect)
    th, tw = transformers_smart_resize(h, w, d.factor, d.min_pixels, d.max_pixels)
    assert model_frame(dialect, w, h) == (tw, th)


def test_frames_differ_from_transformers_only_for_sides_under_half_a_factor():
    """Where the two implementations disagree: a side shorter than factor/2 rounds to 0 in
    transformers (which then enlarges the whole image to min_pixels) but to one factor in
    qwen-vl-utils. E.g. 10x1000 at factor 28: qwen-vl-utils 28x1008, transformers 28x560;
    5x500: 28x504 vs 28x560."""
    assert model_frame("qwen2.5-vl", 10, 1000) == (28, 1008)
    assert transformers_smart_resize(1000, 10, 28, 3136, 16384 * 784) == (560, 28)
    assert model_frame("qwen2.5-vl", 5, 500) == (28, 504)
    assert transformers_smart_resize(500, 5, 28, 3136, 16384 * 784) == (560, 28)


@pytest.mark.parametrize("dialect", sorted(FACTORS))
@FAST
@given(size=image_sizes())
def test_frames_agree_with_transformers_when_both_sides_reach_half_a_factor(dialect, size):
    w, h = size
    d = get_dialect(dialect)
    if min(w, h) < d.factor / 2 + 1:
        return
    th, tw = transformers_smart_resize(h, w, d.factor, d.min_pixels, d.max_pixels)
    assert model_frame(dialect, w, h) == (tw, th)


def test_known_frame_printed_by_qwen_notebook():
    """870x1398 -> 868x1400 under the Qwen2.5-VL defaults, as printed by the OCR cookbook."""
    header = (FIXTURES / "qwen25vl_ocr_text_spotting_receipt.txt").read_text().split(
        "----- RAW MODEL OUTPUT", 1)[0]
    assert "(W,H) = (870, 1398)" in header
    printed = re.search(r"printed: tensor\((\d+)\) tensor\((\d+)\)", header)
    assert printed is not None
    input_h, input_w = int(printed.group(1)), int(printed.group(2))
    assert model_frame("qwen2.5-vl", 870, 1398) == (input_w, input_h) == (868, 1400)
    assert model_frame("qwen2.5-vl", 1024, 1024) == (1036, 1036)
    assert model_frame("qwen2_5_vl", 1024, 1024) == (1036, 1036)  # transformers model_type


def test_fixed_and_unresized_frames():
    for size in [(1, 1), (640, 480), (6000, 40)]:
        assert model_frame("qwen-vl", *size) == (448, 448)
        assert model_frame("qwen-vl", *size, min_pixels=1, max_pixels=2) == (448, 448)
        assert model_frame("deepseek-vl2", *size) == size


def test_geometry_errors():
    assert issubclass(GeometryError, GroundingError)
    for dialect in FACTORS:
        with pytest.raises(GeometryError, match="aspect ratio"):
            model_frame(dialect, 201, 1)
        with pytest.raises(GeometryError, match="aspect ratio"):
            model_frame(dialect, 10, 2011)
        model_frame(dialect, 200, 1)  # exactly 200 is still allowed
        with pytest.raises(GeometryError, match="exceeds max_pixels"):
            model_frame(dialect, 640, 480, min_pixels=5000, max_pixels=4999)
        with pytest.raises(GeometryError, match="no pixels"):
            model_frame(dialect, 0, 480)
        with pytest.raises(GeometryError):  # max_pixels below one factor squared
            model_frame(dialect, 640, 480, min_pixels=1, max_pixels=FACTORS[dialect] ** 2 - 1)
    with pytest.raises(GeometryError, match="input size"):
        result_from_text('{"bbox_2d": [1, 2, 3, 4]}', "qwen2.5-vl", image_size=(10, 10))


# --------------------------------------------------------------------------- round trip

# dialect -> how the model writes one box and one point
def _json_box(c):
    return json.dumps([{"bbox_2d": c, "label": "thing"}])


def _json_point(p):
    return json.dumps([{"point_2d": p, "label": "spot"}])


WRITERS = {
    "qwen2.5-vl": _json_box,
    "qwen3-vl": _json_box,
    "qwen2-vl": lambda c: ("<|object_ref_start|>thing<|object_ref_end|>"
                           f"<|box_start|>({c[0]},{c[1]}),({c[2]},{c[3]})<|box_end|>"),
    "qwen-vl": lambda c: f"<ref>thing</ref><box>({c[0]},{c[1]}),({c[2]},{c[3]})</box>",
    "deepseek-vl2": lambda c: f"<|ref|>thing<|/ref|><|det|>[[{c[0]}, {c[1]}, {c[2]}, {c[3]}]]<|/det|>",
}
NORMS = {"qwen3-vl": 1000, "qwen2-vl": 1000, "qwen-vl": 1000, "deepseek-vl2": 999}


@st.composite
def box_in(draw, size, units):
    """A float box inside the image; half of them at least 1.5 model units across, the
    rest anything down to zero width (hypothesis favours equal and edge values)."""
    w, h = size
    nx, ny = units
    if draw(st.booleans()):
        dx, dy = 1.5 * w / nx, 1.5 * h / ny
        x0 = draw(st.floats(0, w - dx, allow_nan=False))
        y0 = draw(st.floats(0, h - dy, allow_nan=False))
        x1 = draw(st.floats(x0 + dx, w, allow_nan=False))
        y1 = draw(st.floats(y0 + dy, h, allow_nan=False))
        return x0, y0, x1, y1
    xs = sorted(draw(st.floats(0, w, allow_nan=False)) for _ in range(2))
    ys = sorted(draw(st.floats(0, h, allow_nan=False)) for _ in range(2))
    return xs[0], ys[0], xs[1], ys[1]


def model_space(dialect: str, size) -> tuple[tuple[int, int] | None, float, float]:
    """(input_size to pass, units across the width, units across the height)."""
    if dialect in NORMS:
        n = NORMS[dialect]
        return None, n, n
    frame = model_frame(dialect, *size)
    return frame, frame[0], frame[1]


@pytest.mark.parametrize("dialect", sorted(WRITERS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_box_round_trip_within_half_a_model_unit(dialect, data):
    size = data.draw(image_sizes())
    w, h = size
    input_size, nx, ny = model_space(dialect, size)
    truth = data.draw(box_in(size, (nx, ny)))
    written = [round(truth[0] * nx / w), round(truth[1] * ny / h),
               round(truth[2] * nx / w), round(truth[3] * ny / h)]
    # corners in either order: the model sometimes writes them reversed
    if data.draw(st.booleans()):
        written = [written[2], written[3], written[0], written[1]]

    result = result_from_text(WRITERS[dialect](written), dialect, image_size=size,
                              input_size=input_size)

    if written[0] == written[2] or written[1] == written[3]:
        event("edges merged")
        # Rounding merged two edges: only possible for a box at most one unit across.
        assert (truth[2] - truth[0]) * nx / w <= 1 or (truth[3] - truth[1]) * ny / h <= 1
        assert not result.boxes and result.dropped == {"no_area": 1}
        return
    assert len(result.boxes) == 1 and not result.dropped
    box = result.boxes[0]
    tol_x, tol_y = w / nx / 2 + 1e-9, h / ny / 2 + 1e-9
    for got, want, tol in zip(box.bbox, truth, (tol_x, tol_y, tol_x, tol_y), strict=True):
        assert abs(got - want) <= tol, (box.bbox, truth, written)
    assert 0 <= box.bbox[0] < box.bbox[2] <= w and 0 <= box.bbox[1] < box.bbox[3] <= h
    assert box.label == "thing"
    assert list(box.model_bbox) == written
    # and back again: the result's box, expressed in the model's space, is what it wrote
    back = to_model_box(box.bbox, dialect, input_size, size)
    ordered = [min(written[0], written[2]), min(written[1], written[3]),
               max(written[0], written[2]), max(written[1], written[3])]
    assert back == pytest.approx(ordered, abs=1e-6)


@pytest.mark.parametrize("dialect", sorted(FACTORS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_point_round_trip_within_half_a_model_unit(dialect, data):
    size = data.draw(image_sizes())
    w, h = size
    x = data.draw(st.floats(0, w, allow_nan=False))
    y = data.draw(st.floats(0, h, allow_nan=False))
    input_size, nx, ny = model_space(dialect, size)
    written = [round(x * nx / w), round(y * ny / h)]
    result = result_from_text(_json_point(written), dialect, image_size=size,
                              input_size=input_size)
    assert len(result.points) == 1 and not result.dropped
    px, py = result.points[0].point
    assert abs(px - x) <= w / nx / 2 + 1e-9
    assert abs(py - y) <= h / ny / 2 + 1e-9
    assert 0 <= px <= w and 0 <= py <= h


@pytest.mark.parametrize(
    "dialect,size,frame,written,expected",
    [
        # 224 * (29 / 224) = 29.000000000000004 in floating point (found by hypothesis)
        ("qwen2.5-vl", (2, 29), (28, 224), [28, 224], (2, 29)),
        # 1000 * (2007 / 1000) = 2007.0000000000002
        ("qwen3-vl", (2007, 500), None, [1000, 1000], (2007, 500)),
        ("deepseek-vl2", (125, 250), None, [999, 999], (125, 250)),
    ],
)
def test_point_on_the_far_edge_is_kept_on_the_edge(dialect, size, frame, written, expected):
    text = (_json_point(written) if dialect != "deepseek-vl2"
            else f"<|ref|>spot<|/ref|><|det|>[[{written[0]}, {written[1]}]]<|/det|>")
    result = result_from_text(text, dialect, image_size=size, input_size=frame)
    assert result.dropped == {}
    assert result.points[0].point == expected  # exactly on the edge, not a hair outside


@settings(max_examples=100, deadline=None)
@given(size=image_sizes(), data=st.data())
def test_build_result_scales_each_axis_by_its_own_frame_side(size, data):
    """Straight through build_result with a parsed object, absolute qwen2.5-vl frame."""
    w, h = size
    frame = model_frame("qwen2.5-vl", w, h)
    fx = data.draw(st.integers(0, frame[0]))
    fy = data.draw(st.integers(0, frame[1]))
    parsed = ParsedOutput((RawObject("point", (fx, fy), "p"),
                           RawObject("box", (0, 0, frame[0], frame[1]), "all")))
    result = build_result(parsed, "qwen2.5-vl", image_size=size, input_size=frame)
    assert result.points[0].point == pytest.approx((fx * w / frame[0], fy * h / frame[1]))
    assert result.boxes[0].bbox == pytest.approx((0, 0, w, h))
    assert result.input_size == frame and result.image_size == size


# --------------------------------------------------------------------------- clip & drop


def test_clip_drop_and_order_relative():
    size = (200, 100)  # qwen3-vl: 0..1000 -> x * 0.2, y * 0.1
    text = json.dumps([
        {"bbox_2d": [-100, -50, 500, 500], "label": "partly outside"},
        {"bbox_2d": [500, 500, 100, 100], "label": "reversed"},
        {"bbox_2d": [1100, 0, 1200, 500], "label": "right of the image"},
        {"bbox_2d": [0, -300, 400, -10], "label": "above the image"},
        {"bbox_2d": [300, 300, 300, 600], "label": "zero width"},
        {"bbox_2d": [100, 700, 400, 700], "label": "zero height"},
        {"bbox_2d": [900, 900, 1400, 1300], "label": "bottom-right corner"},
        {"point_2d": [1200, 500], "label": "point right"},
        {"point_2d": [500, -1], "label": "point above"},
        {"point_2d": [1000, 1000], "label": "corner point"},
        {"point_2d": [0, 0], "label": "origin"},
    ])
    result = result_from_text(text, "qwen3-vl", image_size=size)
    boxes = {b.label: b.bbox for b in result.boxes}
    assert boxes == {
        "partly outside": pytest.approx((0, 0, 100, 50)),
        "reversed": pytest.approx((20, 10, 100, 50)),
        "bottom-right corner": pytest.approx((180, 90, 200, 100)),
    }
    assert result.dropped == {"no_area": 4, "outside": 2}
    assert {p.label: p.point for p in result.points} == {
        "corner point": pytest.approx((200, 100)), "origin": (0, 0)}
    for b in result.boxes:
        assert 0 <= b.bbox[0] < b.bbox[2] <= 200 and 0 <= b.bbox[1] < b.bbox[3] <= 100


def test_clip_and_drop_absolute_frame():
    size, frame = (870, 1398), (868, 1400)
    text = json.dumps([
        {"bbox_2d": [800, 1300, 900, 1500], "label": "over the edge"},
        {"bbox_2d": [868, 0, 1000, 100], "label": "starts at the right edge"},
        {"point_2d": [869, 10], "label": "just outside"},
    ])
    result = result_from_text(text, "qwen2.5-vl", image_size=size, input_size=frame)
    assert len(result.boxes) == 1
    assert result.boxes[0].bbox == pytest.approx((800 * 870 / 868, 1300 * 1398 / 1400, 870, 1398))
    assert result.dropped == {"no_area": 1, "outside": 1}
    assert not result.points


def test_without_image_size_nothing_is_clipped_only_ordered():
    text = json.dumps([{"bbox_2d": [1200, 900, -5, 10]}, {"bbox_2d": [3, 3, 3, 9]}])
    result = result_from_text(text, "qwen3-vl")
    assert [b.bbox for b in result.boxes] == [(-5, 10, 1200, 900), (3, 3, 3, 9)]
    assert result.dropped == {} and result.image_size is None
