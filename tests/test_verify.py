"""Verification (--verify): crops of the right pixels, yes/no probabilities read from the
right tokens, the tiny model's own numbers, batching and concurrency against a loopback
server, the Detector, `grounding detect --verify` and `grounding label --verify`."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from grounding import load_image
from grounding.backends.base import Generation, Request
from grounding.backends.local import LocalBackend
from grounding.backends.remote.client import OpenAIBackend
from grounding.cli.app import app
from grounding.core.result import Box, Result
from grounding.pipeline.crops import crop_with_context
from grounding.pipeline.detector import Detector
from grounding.pipeline.verify import (
    verification_score,
    verify,
    verify_many,
    verify_prompt,
    yes_probability,
)
from grounding.testing import tiny_checkpoint
from grounding.testing.loopback import LoopbackServer, Reply, grounding_handler

GRAY = (128, 128, 128)
RED = (255, 0, 0)
BLUE = (0, 0, 255)


# ------------------------------------------------------------------------------ geometry


def test_context_grows_each_side_by_a_share_of_the_box():
    image = Image.new("RGB", (200, 100))
    crop, where = crop_with_context(image, (50, 20, 90, 60))
    assert where == (40, 10, 100, 70)
    assert crop.size == (60, 60)
    assert crop_with_context(image, (50, 20, 90, 60), context=0.0)[1] == (50, 20, 90, 60)
    assert crop_with_context(image, (50, 20, 90, 40), context=0.5)[1] == (30, 10, 110, 50)


def test_fractional_boxes_cover_whole_pixels():
    image = Image.new("RGB", (200, 100))
    assert crop_with_context(image, (10.2, 10.7, 40.4, 40.1), context=0.0)[1] == (10, 10, 41, 41)
    assert crop_with_context(image, Box((10.0, 10.0, 40.0, 40.0)), context=0.0)[1] == (
        10, 10, 40, 40)


def test_context_is_clipped_to_the_image():
    image = Image.new("RGB", (200, 100))
    assert crop_with_context(image, (0, 0, 80, 60))[1] == (0, 0, 100, 75)
    assert crop_with_context(image, (120, 40, 200, 100))[1] == (100, 25, 200, 100)


def test_small_boxes_get_min_side_around_their_middle_inside_the_image():
    image = Image.new("RGB", (200, 100))
    assert crop_with_context(image, (100, 50, 102, 52))[1] == (87, 37, 115, 65)
    # at the edge the window shifts inside instead of shrinking
    assert crop_with_context(image, (195, 90, 200, 100))[1] == (172, 72, 200, 100)
    assert crop_with_context(image, (0, 0, 20, 10))[1] == (0, 0, 28, 28)
    assert crop_with_context(image, (100, 50, 102, 52), min_side=64)[1] == (69, 19, 133, 83)
    # an image smaller than min_side: all of it
    assert crop_with_context(Image.new("RGB", (20, 10)), (5, 2, 8, 4))[1] == (0, 0, 20, 10)


def test_crop_is_the_image_pixels():
    a = np.random.RandomState(0).randint(0, 255, (100, 200, 3), dtype=np.uint8)
    crop, (x0, y0, x1, y1) = crop_with_context(Image.fromarray(a), (50.5, 20.5, 90.5, 60.5))
    np.testing.assert_array_equal(np.asarray(crop), a[y0:y1, x0:x1])


def test_bad_boxes_and_options_raise():
    image = Image.new("RGB", (50, 50))
    with pytest.raises(ValueError):
        crop_with_context(image, (1, 2, 3))
    with pytest.raises(ValueError):
        crop_with_context(image, (1, 2, 3, float("nan")))
    with pytest.raises(ValueError):
        crop_with_context(image, (1, 2, 3, 4), context=-0.1)


# The displayed picture: a red rectangle top-left, a blue one bottom-right.
W, H = 240, 160
RED_RECT = (20, 15, 100, 70)
BLUE_RECT = (150, 95, 225, 150)


def displayed() -> np.ndarray:
    a = np.empty((H, W, 3), np.uint8)
    a[:] = GRAY
    for (x0, y0, x1, y1), colour in ((RED_RECT, RED), (BLUE_RECT, BLUE)):
        a[y0:y1, x0:x1] = colour
    return a


def stored_for(orientation: int, u: np.ndarray) -> np.ndarray:
    """What a camera stores so that a viewer honouring the EXIF tag shows ``u`` (from the
    tag's definition: 6 = stored row 0 is shown on the right, 8 = on the left)."""
    t = (1, 0, 2)
    return {6: u[:, ::-1].transpose(t), 8: u[::-1, :].transpose(t)}[orientation]


@pytest.mark.parametrize("orientation", [6, 8])
def test_crops_of_exif_rotated_photos_are_taken_where_the_box_is_shown(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored_for(orientation, displayed()))).save(
        path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (H, W)  # stored on its side
        raw.load()
        unturned = raw.copy()
    for image in (load_image(path), unturned):  # a raw PIL image is turned upright too
        for rect, colour in ((RED_RECT, RED), (BLUE_RECT, BLUE)):
            crop, where = crop_with_context(image, rect, context=0.0)
            assert where == rect
            inner = np.asarray(crop, dtype=np.float64)[3:-3, 3:-3].reshape(-1, 3)
            assert np.abs(inner.mean(axis=0) - colour).max() < 12, (rect, inner.mean(axis=0))


# ------------------------------------------------------------------------- yes/no reading


def gen(top, text="Yes", tokens=None, logprobs=None):
    return Generation(text=text, input_size=(28, 28), tokens=tokens, token_logprobs=logprobs,
                      top_logprobs=top)


def test_yes_probability_sums_yes_like_and_no_like_tokens():
    top = [{"Yes": math.log(0.5), " yes": math.log(0.1), "YES": math.log(0.05),
            "No": math.log(0.15), " no": math.log(0.05), "Maybe": math.log(0.1),
            "yesterday": math.log(0.05)}]
    assert yes_probability(gen(top)) == pytest.approx(0.65 / 0.85, abs=1e-12)
    assert yes_probability(gen([{"Yes": math.log(0.8), "No": math.log(0.2)}])) == (
        pytest.approx(0.8, abs=1e-12))


def test_only_the_first_token_counts():
    top = [{"The": math.log(0.6), "A": math.log(0.3)}, {"Yes": math.log(0.9), "No": -5.0}]
    assert yes_probability(gen(top, text="The answer is yes")) is None
    top = [{"No": math.log(0.7), "Yes": math.log(0.1)}, {"Yes": 0.0}]
    assert yes_probability(gen(top, text="No")) == pytest.approx(0.125)


def test_nothing_to_read_is_none_and_one_sided_is_certain():
    assert yes_probability(gen(None)) is None
    assert yes_probability(gen([])) is None
    assert yes_probability(gen([{"Maybe": -0.1}])) is None
    assert yes_probability(gen([{"Yes": -0.2, "Sure": -2.0}])) == 1.0
    assert yes_probability(gen([{" No": -0.2}])) == 0.0


def test_the_generated_token_counts_when_sent_without_alternatives():
    g = gen([{}], text="No", tokens=["No"], logprobs=[math.log(0.9)])
    assert yes_probability(g) == 0.0
    g = gen([{"No": math.log(0.3)}], text="Yes", tokens=["Yes", "!"], logprobs=[math.log(0.6), 0])
    assert yes_probability(g) == pytest.approx(2 / 3)
    g = gen([{"Yes": math.log(0.6), "No": math.log(0.3)}], text="Yes", tokens=["Yes"],
            logprobs=[math.log(0.6)])
    assert yes_probability(g) == pytest.approx(2 / 3)  # not counted twice


def test_answer_words_can_be_changed():
    top = [{"是": math.log(0.3), "否": math.log(0.6), "Yes": math.log(0.1)}]
    assert yes_probability(gen(top), yes=("是",), no=("否",)) == pytest.approx(1 / 3)


def test_without_logprobs_the_answer_text_decides():
    assert verification_score(gen(None, text="Yes.")) == 1.0
    assert verification_score(gen(None, text=" no, it is a dog")) == 0.0
    assert verification_score(gen(None, text="Perhaps")) is None
    # with log-probabilities the text is not looked at
    assert verification_score(gen([{"Maybe": -0.1}], text="Yes")) is None


def test_prompt():
    assert verify_prompt("cat") == "Is this a cat? Answer yes or no."
    assert verify_prompt("apple") == "Is this an apple? Answer yes or no."
    assert verify_prompt("the red car") == "Is this the red car? Answer yes or no."
    assert verify_prompt(None) == "Is this an object? Answer yes or no."


# --------------------------------------------------------------- tiny checkpoint (local)


@pytest.fixture(scope="module")
def tiny():
    return LocalBackend(str(tiny_checkpoint("qwen2.5-vl")), max_new_tokens=8)


def noise(w, h, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), np.uint8))


def noisy_results():
    results = []
    for seed, (w, h) in enumerate([(160, 120), (90, 140), (200, 80)]):
        boxes = [Box((w * 0.1, h * 0.1, w * 0.5, h * 0.6), "cat"),
                 Box((w * 0.4, h * 0.3, w * 0.9, h * 0.95), "dog"),
                 Box((0.0, 0.0, 10.0, 10.0), "apple")]
        results.append(Result(boxes=boxes, width=w, height=h).attach(noise(w, h, seed)))
    return results


def first_token_top(backend, crop, prompt):
    """The model's own top-10 first tokens for this crop and prompt, by one forward pass
    (the decoded text of each id, as the backend reports it)."""
    frame = backend.frame(crop.size)
    inputs = backend.processor(text=[backend._chat(Request(crop, prompt))],
                               images=[crop.resize(frame, Image.Resampling.BICUBIC)],
                               return_tensors="pt", do_resize=False)
    with torch.inference_mode():
        logits = backend.net(**inputs).logits[0, -1]
    values, ids = torch.log_softmax(logits.float(), -1).topk(10)
    return {backend.tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist(),
                                                             strict=True)}


def spy_on(backend, monkeypatch):
    calls = []
    real = backend.generate

    def generate(requests):
        out = real(requests)
        calls.append((requests, out))
        return out

    monkeypatch.setattr(backend, "generate", generate)
    return calls


def test_tiny_model_has_no_yes_or_no_token_so_boxes_stay_unscored(tiny, monkeypatch):
    """The tiny tokenizer splits "yes" into "y"+"es": no first token can say yes or no, so
    every score is None and every box is kept, after one-token requests in batches."""
    vocab = [tiny.tokenizer.decode([i]) for i in range(tiny.net.config.text_config.vocab_size)]
    assert not {v.strip().casefold() for v in vocab} & {"yes", "no"}
    calls = spy_on(tiny, monkeypatch)
    results = noisy_results()
    out = verify_many(results, None, tiny, batch_size=4)
    assert [len(requests) for requests, _ in calls] == [4, 4, 1]
    for requests, gens in calls:
        assert all(r.max_new_tokens == 1 for r in requests)
        assert all(len(g.tokens) <= 1 and len(g.top_logprobs) <= 1 for g in gens)
    assert [len(r.boxes) for r in out] == [3, 3, 3]
    assert all(b.attributes["verify_score"] is None for r in out for b in r.boxes)
    assert all("unverified" not in r.dropped for r in out)
    assert all("verify_score" not in b.attributes for r in results for b in r.boxes)


def test_tiny_model_alternatives_with_the_same_text_are_summed(tiny, monkeypatch):
    """Token ids that decode to the same text (byte fragments, '') are one alternative
    with their summed probability, not the last one seen: here every odd id is made to
    read "same", so the top 10 hold about five colliding ids."""
    crop = noise(120, 90, 5)
    prompt = verify_prompt("cat")
    frame = tiny.frame(crop.size)
    inputs = tiny.processor(text=[tiny._chat(Request(crop, prompt))],
                            images=[crop.resize(frame, Image.Resampling.BICUBIC)],
                            return_tensors="pt", do_resize=False)
    with torch.inference_mode():
        logits = tiny.net(**inputs).logits[0, -1]
    values, ids = torch.log_softmax(logits.float(), -1).topk(10)
    odd = [v for i, v in zip(ids.tolist(), values.tolist(), strict=True) if i % 2]
    assert len(odd) >= 2, "pick another crop: fewer than two odd ids in the top 10"
    real = tiny.token_texts
    monkeypatch.setattr(tiny, "token_texts", lambda batch: [
        "same" if i % 2 else f"even{i}" for i, _ in zip(batch, real(batch), strict=True)])
    (generation,) = tiny.generate([Request(crop, prompt, max_new_tokens=1)])
    top = generation.top_logprobs[0]
    assert len(top) == 10 - len(odd) + 1
    assert top["same"] == pytest.approx(float(torch.tensor(odd).logsumexp(0)), abs=1e-5)
    for i, v in zip(ids.tolist(), values.tolist(), strict=True):
        if not i % 2:
            assert top[f"even{i}"] == pytest.approx(v, abs=1e-5)
    # no probability lost: the alternatives still add up to the top 10's mass
    assert sum(math.exp(v) for v in top.values()) == pytest.approx(
        float(values.exp().sum()), rel=1e-4)


def test_loopback_yes_and_no_split_over_tokens_of_the_same_text_add_up():
    """A server's top_logprobs may list two tokens that read "Yes" (and '' twice): the
    yes/no probability must count both, not the last one listed."""

    def split_answer(request) -> Reply:
        top = [("Yes", 0.30), ("No", 0.20), ("", 0.05), ("Yes", 0.30), ("No", 0.05),
               ("", 0.05)]
        entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
                   for t, p in top]
        choice = {"index": 0, "message": {"role": "assistant", "content": "Yes"},
                  "finish_reason": "length",
                  "logprobs": {"content": [{"token": "Yes", "logprob": math.log(0.30),
                                            "bytes": list(b"Yes"), "top_logprobs": entries}]}}
        return Reply(200, {"id": "chatcmpl-split", "object": "chat.completion", "created": 0,
                           "model": request.model, "choices": [choice]})

    with LoopbackServer(handler=split_answer) as server:
        backend = backend_for(server)
        (generation,) = backend.generate([Request(scene((40, 40)), "Is this a cat? Answer "
                                                  "yes or no.", task="text",
                                                  max_new_tokens=1)])
        backend.close()
    assert math.exp(generation.top_logprobs[0]["Yes"]) == pytest.approx(0.60)
    assert math.exp(generation.top_logprobs[0][""]) == pytest.approx(0.10)
    assert verification_score(generation) == pytest.approx(0.60 / 0.85)


def test_tiny_model_scores_are_its_own_first_token_probabilities(tiny, monkeypatch):
    """With answer words the tiny model does rank in its top 10, every box of every image
    (verified in one go, in batches) gets P(word1) / (P(word1) + P(word2)) from a forward
    pass of exactly its crop and question."""
    results = noisy_results()
    tops = []
    for result in results:
        for box in result.boxes:
            crop, _ = crop_with_context(result._image, box)
            tops.append(first_token_top(tiny, crop, verify_prompt(box.label)))
    vocab = [tiny.tokenizer.decode([i]) for i in range(tiny.net.config.text_config.vocab_size)]
    forms = Counter(v.strip().casefold() for v in vocab)
    # words in every box's top 10 whose text no other token shares
    common = sorted(w for w in set.intersection(*(set(t) for t in tops))
                    if w.strip() and forms[w.strip().casefold()] == 1)
    assert len(common) >= 2, common
    yes, no = common[:2]
    expected = [math.exp(t[yes]) / (math.exp(t[yes]) + math.exp(t[no])) for t in tops]
    calls = spy_on(tiny, monkeypatch)
    out = verify_many(results, None, tiny, threshold=0.0, batch_size=4, yes=(yes,), no=(no,))
    assert sum(len(requests) for requests, _ in calls) == 9 and len(calls) == 3
    got = [b.attributes["verify_score"] for r in out for b in r.boxes]
    # the boxes differ by ~1e-2; batched vs one forward by < 1e-6
    assert max(expected) - min(expected) > 5e-3
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # the threshold drops exactly the boxes under it, per image
    ranked = sorted(got)
    cut = (ranked[4] + ranked[5]) / 2
    kept = verify_many(results, None, tiny, threshold=cut, batch_size=4, yes=(yes,), no=(no,))
    scores = np.array(got).reshape(3, 3)
    assert sum(len(r.boxes) for r in kept) == 4
    for result, row in zip(kept, scores, strict=True):
        assert [b.attributes["verify_score"] for b in result.boxes] == pytest.approx(
            [s for s in row if s > cut], abs=1e-4)
        assert result.dropped.get("unverified", 0) == 3 - len(result.boxes)


# -------------------------------------------------------------------------- loopback


def yes_no_reply(p_yes: float, request) -> Reply:
    """A chat completion whose first token has top log-probabilities {Yes: p, No: 1-p}."""
    first = "Yes" if p_yes >= 0.5 else "No"
    top = [{"token": "Yes", "logprob": math.log(p_yes), "bytes": list(b"Yes")},
           {"token": "No", "logprob": math.log(1 - p_yes), "bytes": list(b"No")}]
    choice = {"index": 0, "message": {"role": "assistant", "content": first},
              "finish_reason": "length",
              "logprobs": {"content": [{"token": first, "logprob": top[first == "No"]["logprob"],
                                        "bytes": list(first.encode()), "top_logprobs": top}]}}
    return Reply(200, {"id": "chatcmpl-yn", "object": "chat.completion", "created": 0,
                       "model": request.model, "choices": [choice]})


def red_in_the_middle(request) -> bool:
    a = np.asarray(request.image().convert("RGB"), dtype=np.int32)
    r, g, b = a[a.shape[0] // 2, a.shape[1] // 2]
    return r > 200 and g < 60 and b < 60


def verifier(request) -> Reply:
    """0.8 yes when the crop shows red in its middle, else 0.2."""
    return yes_no_reply(0.8 if red_in_the_middle(request) else 0.2, request)


def detect_and_verify(dialect="qwen2.5-vl"):
    """A perfect detector of the red rectangle that also answers verification questions."""
    detect = grounding_handler(dialect)

    def handle(request):
        if "Answer yes or no" in request.text:
            return verifier(request)
        return detect(request)

    return handle


def scene(size, red_rects=(), blue_rects=()):
    a = np.empty((size[1], size[0], 3), np.uint8)
    a[:] = GRAY
    for rects, colour in ((red_rects, RED), (blue_rects, BLUE)):
        for x0, y0, x1, y1 in rects:
            a[y0:y1, x0:x1] = colour
    return Image.fromarray(a)


def backend_for(server, **options):
    options.setdefault("image_format", "png")  # the crops are compared pixel for pixel
    options.setdefault("timeout", 10.0)
    return OpenAIBackend("loopback-model", base_url=server.base_url, dialect="qwen2.5-vl",
                         backoff=0.01, max_backoff=0.05, **options)


def two_red_two_gray(seed):
    w, h = 200 + 20 * seed, 150
    red = [(10, 10, 60, 60), (120, 80, 180, 140)]
    gray = [(80, 10, 110, 40), (20, 90, 70, 140)]
    image = scene((w, h), red)
    boxes = [Box(tuple(map(float, r)), "red box") for r in red] + [
        Box(tuple(map(float, g)), "red box") for g in gray]
    return Result(boxes=boxes, width=w, height=h, image=f"img{seed}.png").attach(image)


def test_loopback_scores_threshold_batching_and_crops():
    results = [two_red_two_gray(s) for s in range(3)]
    with LoopbackServer(handler=verifier, latency=0.05) as server:
        backend = backend_for(server, concurrency=3)
        out = verify_many(results, None, backend, threshold=0.5)
        kept_all = verify_many(results, None, backend, threshold=0.0)
        requests = server.completions[:12]
    assert server.errors == []
    # every box of every image in one stream, concurrency respected and used
    assert len(server.completions) == 24
    assert server.max_in_flight == 3
    for result in kept_all:
        assert [b.attributes["verify_score"] for b in result.boxes] == pytest.approx(
            [0.8, 0.8, 0.2, 0.2])
        assert "unverified" not in result.dropped
    for result in out:
        assert [b.bbox for b in result.boxes] == [(10, 10, 60, 60), (120, 80, 180, 140)]
        assert result.dropped == {"unverified": 2}
    assert all(len(r.boxes) == 4 for r in results)  # the inputs are left as they were
    # one token asked for, the label in the question, the crop's pixels exactly
    assert all(r.json["max_tokens"] == 1 for r in requests)
    assert all(r.text == "Is this a red box? Answer yes or no." for r in requests)
    received = [np.asarray(r.image().convert("RGB")) for r in requests]
    for result in results:
        for box in result.boxes:
            crop, _ = crop_with_context(result._image, box)
            sent = np.asarray(crop.resize(backend.frame(crop.size), Image.Resampling.BICUBIC))
            assert any(s.shape == sent.shape and np.array_equal(s, sent) for s in received)
    backend.close()


def test_verify_one_result_and_failures_keep_the_box():
    result = two_red_two_gray(0)
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        if calls["n"] == 2:
            return Reply(400, {"error": {"message": "bad image"}})
        return verifier(request)

    with LoopbackServer(handler=flaky) as server:
        backend = backend_for(server, concurrency=1, max_retries=0)
        out = verify(result, None, backend, threshold=0.5)
        backend.close()
    # the second (red) box failed and is kept unscored; the two gray ones are dropped
    assert len(out.boxes) == 2 and out.dropped == {"unverified": 2}
    assert out.boxes[0].attributes == {"verify_score": pytest.approx(0.8)}
    assert out.boxes[1].attributes["verify_score"] is None
    assert "bad image" in out.boxes[1].attributes["verify_error"]


def test_image_must_match_the_result():
    result = two_red_two_gray(0)
    with pytest.raises(ValueError, match="is 10x10 but the result is for 200x150"):
        verify(result, Image.new("RGB", (10, 10)), backend=None)


def test_detector_verifies_with_no_more_than_concurrency_in_flight():
    images = [scene((160 + 10 * i, 120), [(20, 30, 90, 100)]) for i in range(5)]
    with LoopbackServer(handler=detect_and_verify(), latency=0.02) as server:
        backend = backend_for(server, concurrency=2)
        plain = list(Detector(backend, batch_size=2).detect_many(images, prompt="the red box"))
        det = Detector(backend, batch_size=2, verify=True)
        results = list(det.detect_many(images, prompt="the red box"))
        strict = list(det.detect_many(images, prompt="the red box", verify_threshold=0.9))
        backend.close()
    assert server.errors == [] and server.max_in_flight <= 2
    assert all("verify_score" not in r.boxes[0].attributes for r in plain)
    assert [len(r.boxes) for r in results] == [1] * 5
    assert all(r.boxes[0].attributes["verify_score"] == pytest.approx(0.8) for r in results)
    assert [len(r.boxes) for r in strict] == [0] * 5
    assert all(r.dropped["unverified"] == 1 for r in strict)


def test_detector_verifies_with_a_local_style_backend():
    """A backend without stream(): verification goes through generate() in batches."""

    class Answering:
        def __init__(self):
            from grounding.testing import StaticBackend

            self.static = StaticBackend(label="thing")
            self.dialect, self.model = self.static.dialect, self.static.model
            self.batches = []

        def frame(self, size):
            return self.static.frame(size)

        def generate(self, requests):
            self.batches.append(len(requests))
            if requests[0].max_new_tokens == 1:
                return [gen([{"Yes": math.log(0.3), "No": math.log(0.7)}], text="No")
                        for _ in requests]
            return self.static.generate(requests)

    backend = Answering()
    det = Detector(backend, batch_size=3)
    images = [noise(100, 80, i) for i in range(4)]
    kept = list(det.detect_many(images, ["thing"], verify=True, verify_threshold=0.25))
    assert [b.attributes["verify_score"] for r in kept for b in r.boxes] == pytest.approx(
        [0.3] * 4)
    dropped = list(det.detect_many(images, ["thing"], verify=True))
    assert all(len(r.boxes) == 0 and r.dropped["unverified"] == 1 for r in dropped)


# ------------------------------------------------------------------------------- CLI


def test_cli_detect_verify(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"a{i}.png")
        scene((150 + 10 * i, 100), [(20, 20, 80, 70)]).save(paths[-1])
    runner = CliRunner()
    common = ["--prompt", "the red box", "--backend", "openai", "--model", "loopback",
              "--dialect", "qwen2.5-vl", "--concurrency", "2"]
    with LoopbackServer(handler=detect_and_verify()) as server:
        base = ["detect", *map(str, paths), *common, "--base-url", server.base_url]
        out = runner.invoke(app, [*base, "--verify"])
        strict = runner.invoke(app, [*base, "--verify", "--verify-threshold", "0.9"])
        to_dir = runner.invoke(app, [*base, "--verify", "--out", str(tmp_path / "out")])
    with LoopbackServer(handler=detect_and_verify()) as server:
        base = ["detect", *map(str, paths), *common, "--base-url", server.base_url]
        schema = runner.invoke(app, [*base, "--verify", "--json-schema"])
        bodies = [r.json for r in server.requests if r.json]
    assert out.exit_code == 0, out.output
    assert to_dir.exit_code == 0, to_dir.output
    saved = json.loads((tmp_path / "out" / "a1.json").read_text())
    assert saved["detections"][0]["attributes"]["verify_score"] == pytest.approx(0.8)
    with Image.open(tmp_path / "out" / "a1.jpg") as overlay:
        assert overlay.size == (160, 100)
    # The box schema constrains detection requests only, never the yes/no questions.
    assert schema.exit_code == 0, schema.output
    asks = [b for b in bodies if b.get("max_tokens") == 1]
    detects = [b for b in bodies if b.get("max_tokens") != 1]
    assert len(asks) == 3 and len(detects) == 3
    assert all("response_format" not in b for b in asks)
    assert all(b["response_format"]["type"] == "json_schema" for b in detects)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 3
    for record in records:
        [d] = record["detections"]
        assert d["attributes"]["verify_score"] == pytest.approx(0.8)
        assert d["bbox"] == pytest.approx([20, 20, 80, 70], abs=1)
    assert strict.exit_code == 0, strict.output
    for line in strict.stdout.splitlines():
        record = json.loads(line)
        assert record["detections"] == [] and record["dropped"] == {"unverified": 1}


def test_cli_label_verify_is_part_of_the_run_config(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        scene((150, 100 + 10 * i), [(30, 20, 90, 80)]).save(images / f"{i}.png")
    run = tmp_path / "run"
    runner = CliRunner()
    with LoopbackServer(handler=detect_and_verify()) as server:
        base = ["label", str(images), "--out", str(run), "--classes", "red box", "--backend",
                "openai", "--base-url", server.base_url, "--model", "loopback", "--dialect",
                "qwen2.5-vl"]
        first = runner.invoke(app, [*base, "--verify"])
        again = runner.invoke(app, [*base, "--verify"])
        changed = runner.invoke(app, [*base, "--verify", "--verify-threshold", "0.7"])
    assert first.exit_code == 0, first.output
    config = json.loads((run / "run.json").read_text())
    assert config["verify"] is True and config["verify_threshold"] == 0.5
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["detections"][0]["attributes"]["verify_score"] for r in records] == pytest.approx(
        [0.8, 0.8])
    assert again.exit_code == 0, again.output
    assert changed.exit_code == 2 and "verify_threshold" in changed.stderr


def test_runs_made_before_verify_existed_still_resume(tmp_path):
    from grounding.pipeline.detector import Query
    from grounding.runs.labeling import run_config
    from grounding.runs.rundir import RunDir
    from grounding.testing import StaticBackend

    images = tmp_path / "images"
    images.mkdir()
    config = run_config(Detector(StaticBackend()), Query.make(["object"]), images, (0, 1))
    assert config["verify"] is False and config["verify_threshold"] is None
    old = {k: v for k, v in config.items() if not k.startswith("verify")}
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.run_json.write_text(json.dumps(old))
    run.start(config)  # no RunConfigError
    verified_config = run_config(Detector(StaticBackend(), verify=True), Query.make(["object"]),
                                 images, (0, 1))
    run.predictions.write_text('{"image": "a.jpg"}\n')  # a run with a record binds its config
    with pytest.raises(Exception, match="verify"):
        run.start(verified_config)
