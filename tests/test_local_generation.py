"""The local backend's generation loop on tiny checkpoints: scores recorded step by step
equal the full-logits computation, token texts, per-request limits in a batch, GPU
out-of-memory handling (injected on CPU), and the accelerate loading path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.backends import Request
from grounding.backends.base import TOP_LOGPROBS, alternatives
from grounding.backends.local import GPUOutOfMemory, LocalBackend
from grounding.backends.token_scores import TokenTexts
from grounding.pipeline.detector import Detector
from grounding.testing import tiny_checkpoint


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def backend(request):
    return LocalBackend(str(tiny_checkpoint(request.param)), max_new_tokens=10)


def noise(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def full_logits_reference(backend, requests, max_new_tokens):
    """What the backend computed before: output_logits=True, stacked, log-softmaxed."""
    images = [r.image.resize(backend.frame(r.image.size), Image.Resampling.BICUBIC)
              for r in requests]
    inputs = backend.processor(text=[backend._chat(r) for r in requests], images=images,
                               padding=True, return_tensors="pt", do_resize=False)
    with torch.inference_mode():
        out = backend.net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True,
                                   pad_token_id=backend.pad_id)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    chosen = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    values, ids = logp.topk(TOP_LOGPROBS, dim=-1)
    return new, chosen, values, ids


def test_recorded_scores_equal_the_full_logits_computation(backend):
    requests = [Request(noise(w, h, seed=i), "Find every cat")
                for i, (w, h) in enumerate([(320, 240), (200, 300), (90, 60)])]
    got = backend.generate(requests)
    new, chosen, values, ids = full_logits_reference(backend, requests, backend.max_new_tokens)
    for b, gen in enumerate(got):
        n = len(gen.tokens)
        assert gen.tokens == [backend.tokenizer.decode([t], skip_special_tokens=False)
                              for t in new[b, :n].tolist()]
        np.testing.assert_allclose(gen.token_logprobs, chosen[b, :n].tolist(), atol=1e-5)
        assert len(gen.top_logprobs) == n
        for i, top in enumerate(gen.top_logprobs):
            expected = alternatives(
                (backend.tokenizer.decode([t], skip_special_tokens=False), v)
                for t, v in zip(ids[b, i].tolist(), values[b, i].tolist(), strict=True))
            assert top.keys() == expected.keys()
            np.testing.assert_allclose([top[k] for k in expected], list(expected.values()),
                                       atol=1e-5)


def test_generation_keeps_no_full_logits(backend, monkeypatch):
    seen = {}
    original = backend.net.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend.net, "generate", spy)
    backend.generate([Request(noise(64, 64), "Find cats")])
    assert not seen.get("output_logits") and not seen.get("output_scores")
    assert not seen.get("return_dict_in_generate")


def test_token_texts_equal_decoding_each_token_alone(backend):
    tokenizer = backend.tokenizer
    ids = list(range(backend.net.config.text_config.vocab_size))  # padded past the tokenizer
    texts = TokenTexts(tokenizer)(ids)
    assert texts == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert "<|im_end|>" in texts and any(t == "\ufffd" for t in texts)  # specials, byte pieces


@pytest.fixture()
def endless(backend, monkeypatch):
    """The backend with end-of-sequence disabled: every row runs to its limit."""
    monkeypatch.setattr(backend.net.generation_config, "eos_token_id", None)
    monkeypatch.setattr(backend, "eos_ids", set())
    return backend


def test_each_request_stops_at_its_own_limit_in_a_mixed_batch(endless):
    short = Request(noise(100, 80, seed=1), "Is this a cat? Answer yes or no.",
                    max_new_tokens=1)
    long = Request(noise(120, 90, seed=2), "Find cats", max_new_tokens=7)
    default = Request(noise(90, 120, seed=3), "Find dogs")
    batched = endless.generate([short, long, default])
    assert [len(g.tokens) for g in batched] == [1, 7, endless.max_new_tokens]
    assert all(g.truncated for g in batched)
    for b, request in zip(batched, [short, long, default], strict=True):
        [alone] = endless.generate([request])
        assert b.tokens == alone.tokens and b.text == alone.text
        np.testing.assert_allclose(b.token_logprobs, alone.token_logprobs, atol=1e-4)


def test_a_row_that_ends_before_its_limit_is_not_truncated(backend):
    """Stopping is the model's own wherever it writes end-of-sequence first."""
    [gen] = backend.generate([Request(noise(100, 100), "Find cats", max_new_tokens=40)])
    assert gen.truncated == (len(gen.tokens) == 40)
    raw = backend.net.generate(
        **backend.processor(text=[backend._chat(Request(noise(100, 100), "Find cats"))],
                            images=[noise(100, 100).resize(backend.frame((100, 100)),
                                                           Image.Resampling.BICUBIC)],
                            return_tensors="pt", do_resize=False),
        max_new_tokens=40, do_sample=False, pad_token_id=backend.pad_id)
    ended = any(t in backend.eos_ids for t in raw[0, -40:].tolist())
    assert gen.truncated == (not ended)


def test_out_of_memory_halves_the_batch_and_fails_only_the_image_that_cannot_fit(
        backend, monkeypatch):
    sizes = []
    original = backend.net.generate

    def tight(*args, **kwargs):
        batch = kwargs["input_ids"].shape[0]
        sizes.append(batch)
        # 999 px wide is one image too many for this "GPU"; batches over 2 never fit.
        grids = [tuple(g) for g in kwargs["image_grid_thw"].tolist()]
        if batch > 2 or huge_grid in grids:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(*args, **kwargs)

    huge = noise(999, 777, seed=9)
    w, h = backend.frame(huge.size)
    huge_grid = (1, h // backend.patch_size, w // backend.patch_size)
    monkeypatch.setattr(backend.net, "generate", tight)
    monkeypatch.setattr(backend, "batch_cap", None)
    images = [noise(64 + 8 * i, 48, seed=i) for i in range(4)] + [huge]
    results = list(Detector(backend, batch_size=8).detect_many(images, ["cat"]))
    assert [r.error is None for r in results] == [True] * 4 + [False]
    assert "out of GPU memory: lower --max-pixels or --batch-size" in results[4].error
    assert sizes[0] == 5 and max(sizes[1:]) <= 3 and 1 in sizes
    assert backend.batch_cap is not None and backend.batch_cap <= 3
    assert isinstance(backend.generate([Request(huge, "x")])[0], GPUOutOfMemory)
    # Later batches start at the size that fitted instead of failing again.
    sizes.clear()
    backend.generate([Request(noise(64, 48, seed=i), "x") for i in range(4)])
    assert sizes and max(sizes) <= backend.batch_cap


def test_the_cpu_load_goes_through_the_device_map_path(backend, monkeypatch):
    """The same from_pretrained(device_map=...) call a GPU user gets, so a missing
    accelerate fails here too, in one line."""
    assert backend.placement.device_map == {"": "cpu"}
    assert backend.placement.dtype == "float32"
    assert next(backend.net.parameters()).dtype == torch.float32
    from transformers.integrations import accelerate

    monkeypatch.setattr(accelerate, "is_accelerate_available", lambda *a: False)
    with pytest.raises(Exception, match="requires `accelerate`") as info:
        LocalBackend(backend.model)
    assert "\n" not in str(info.value)


def test_without_score_capture_the_text_is_the_same_and_nothing_is_scored(backend, monkeypatch):
    request = Request(noise(160, 120, seed=4), "Find cats")
    [scored] = backend.generate([request])
    monkeypatch.setattr(backend, "scores", False)
    [plain] = backend.generate([request])
    assert plain.text == scored.text and plain.truncated == scored.truncated
    assert plain.tokens is None and plain.token_logprobs is None and plain.top_logprobs is None


@pytest.mark.parametrize("width", [151_936, 1_000, 300, 7])
def test_top_k_and_lse_equal_torch_topk_and_logsumexp(width):
    from grounding.backends.token_scores import top_k_and_lse

    generator = torch.Generator().manual_seed(width)
    logits = torch.randn(5, width, generator=generator) * 4
    logits[1, -1] = 50.0  # a winner in the tail past the last whole chunk
    logits[2, :3] = 40.0  # several winners in one chunk
    k = min(10, width)
    values, ids, lse = top_k_and_lse(logits, k)
    expected_values, expected_ids = logits.topk(k, dim=-1)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(ids.sort(dim=-1).values, expected_ids.sort(dim=-1).values)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [0.01, 30.0, 200.0])
def test_log_sum_exp_holds_for_small_and_huge_logits(scale):
    """The unshifted CPU path must not overflow: past |60| the shifted one takes over."""
    from grounding.backends.token_scores import top_k_and_lse

    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)) * scale
    scratch = torch.empty_like(logits)
    _, _, lse = top_k_and_lse(logits, 10, scratch=scratch)
    expected = torch.logsumexp(logits.double(), dim=-1).float()
    torch.testing.assert_close(lse, expected, rtol=1e-6, atol=1e-5)
    assert torch.isfinite(lse).all()
