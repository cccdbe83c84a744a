"""The real transformers path end to end on tiny random checkpoints (CPU, offline).

Random weights write garbage, so these tests check frames, batching, token accounting,
records and overlays, never the text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from grounding import model_frame
from grounding.backends import Request
from grounding.backends.local import LocalBackend, ModelLoadError
from grounding.cli.app import app
from grounding.core.result import Box, Result
from grounding.pipeline.detector import Detector, Query
from grounding.testing import tiny_checkpoint

FAMILIES = ["qwen2.5-vl", "qwen3-vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def backend(request):
    return LocalBackend(str(tiny_checkpoint(request.param)), max_new_tokens=12)


def noise(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def test_dialect_follows_the_checkpoint(backend):
    assert backend.dialect.name == backend.net.config.model_type.replace("_", "").replace(
        "qwen25vl", "qwen2.5-vl").replace("qwen3vl", "qwen3-vl")


@pytest.mark.parametrize("size", [(640, 480), (200, 150), (333, 777), (1000, 90), (57, 57),
                                  (1280, 720), (2000, 1500)])
def test_model_frame_read_from_processor_equals_prediction(backend, size):
    backend.max_new_tokens = 1
    try:
        [gen] = backend.generate([Request(noise(*size), "Find cats")])
    finally:
        backend.max_new_tokens = 12
    assert not isinstance(gen, Exception), gen
    low, high = backend.dialect.budget
    assert gen.input_size == model_frame(backend.dialect, *size, min_pixels=low, max_pixels=high)
    assert gen.input_size == backend.frame(size)


def test_pixel_budget_changes_the_frame():
    ckpt = tiny_checkpoint("qwen2.5-vl")
    small = LocalBackend(str(ckpt), max_pixels=128 * 28 * 28, max_new_tokens=1)
    [gen] = small.generate([Request(noise(1280, 960), "Find cats")])
    assert gen.input_size == model_frame("qwen2.5-vl", 1280, 960, max_pixels=128 * 28 * 28)
    assert gen.input_size[0] * gen.input_size[1] <= 128 * 28 * 28


def test_batched_equals_one_at_a_time(backend):
    requests = [Request(noise(w, h, seed=i), "Outline each cat")
                for i, (w, h) in enumerate([(640, 480), (200, 150), (333, 777)])]
    batched = backend.generate(requests)
    single = [backend.generate([r])[0] for r in requests]
    for b, s in zip(batched, single, strict=True):
        assert b.text == s.text
        assert b.input_size == s.input_size
        np.testing.assert_allclose(b.token_logprobs, s.token_logprobs, atol=1e-4)


def test_references_share_the_message_and_the_frame_is_the_last_images(backend):
    """Reference images of other sizes before the image: the frame is the target's, the
    references really reach the model (the answer depends on them), and a batch mixing
    requests with and without references equals one request at a time."""
    target = noise(333, 250, seed=1)
    refs = (noise(640, 480, seed=2), noise(120, 90, seed=3))
    plain = Request(target, "Outline each cat")
    shown = Request(target, "Outline each cat", references=refs)
    other = Request(noise(200, 150, seed=4), "Outline each cat", references=refs[:1])
    batched = backend.generate([plain, shown, other])
    single = [backend.generate([r])[0] for r in (plain, shown, other)]
    for b, s in zip(batched, single, strict=True):
        assert not isinstance(b, Exception), b
        assert b.text == s.text
        np.testing.assert_allclose(b.token_logprobs, s.token_logprobs, atol=1e-4)
    assert batched[1].input_size == backend.frame((333, 250)) == batched[0].input_size
    assert batched[2].input_size == backend.frame((200, 150))
    assert batched[1].token_logprobs != batched[0].token_logprobs
    # Token accounting: the message holds every image's visual tokens, each in its frame.
    pad = backend.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def visual_tokens(request: Request) -> int:
        images = [im.resize(backend.frame(im.size)) for im in (*request.references,
                                                                 request.image)]
        inputs = backend.processor(text=[backend._chat(request)], images=images,
                                   do_resize=False)
        return list(inputs["input_ids"][0]).count(pad)

    alone = [visual_tokens(Request(im, "x")) for im in (*refs, target)]
    assert visual_tokens(shown) == sum(alone) and min(alone) > 0


def test_deterministic(backend):
    r = Request(noise(320, 240), "Find dogs")
    assert backend.generate([r])[0].text == backend.generate([r])[0].text


def test_logprobs_are_the_models_own_numbers(backend):
    """Teacher-force the generated tokens and compare log-probabilities."""
    request = Request(noise(320, 240, seed=3), "Find dogs")
    [gen] = backend.generate([request])
    assert len(gen.token_logprobs) == len(gen.tokens) <= backend.max_new_tokens
    assert all(lp <= 0 for lp in gen.token_logprobs)
    frame = backend.frame((320, 240))
    inputs = backend.processor(text=[backend._chat(request)],
                               images=[request.image.resize(frame, Image.Resampling.BICUBIC)],
                               return_tensors="pt", do_resize=False)
    prompt_len = inputs["input_ids"].shape[1]
    generated = backend.net.generate(**inputs, max_new_tokens=backend.max_new_tokens,
                                     do_sample=False, pad_token_id=backend.pad_id)
    new = generated[:, prompt_len:][0].tolist()[: len(gen.token_logprobs)]
    full = torch.tensor([inputs["input_ids"][0].tolist() + new])
    extra = {}
    if "mm_token_type_ids" in inputs:  # Qwen3-VL's M-RoPE needs it; generated text is type 0
        types = inputs["mm_token_type_ids"][0].tolist() + [0] * len(new)
        extra["mm_token_type_ids"] = torch.tensor([types])
    with torch.inference_mode():
        logits = backend.net(input_ids=full, attention_mask=torch.ones_like(full),
                             pixel_values=inputs["pixel_values"],
                             image_grid_thw=inputs["image_grid_thw"], **extra).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    expected = [logp[prompt_len - 1 + i, t].item() for i, t in enumerate(new)]
    # KV-cached decoding vs one full forward differ by ~1e-3 here; a token off by one
    # position would be off by ~5e-2 (neighbouring log-probs differ that much).
    np.testing.assert_allclose(gen.token_logprobs, expected, atol=5e-3)
    # Greedy: every chosen token is the most likely one (up to the same numeric noise).
    for i, t in enumerate(new):
        row = logp[prompt_len - 1 + i]
        assert row.max().item() - row[t].item() < 5e-3


def test_hitting_the_token_limit_is_flagged(backend, monkeypatch):
    """With end-of-sequence disabled the answer runs to max_new_tokens and is flagged
    truncated; made to end by itself (its k-th token declared end-of-sequence) it is not,
    even when it ends on the last token it was allowed."""
    limit = backend.max_new_tokens
    request = Request(noise(100, 100), "Find cats")
    rows = []
    generate = backend.net.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        rows.append(out[0, kwargs["input_ids"].shape[1]:].tolist())
        return out

    monkeypatch.setattr(backend.net, "generate", spy)
    monkeypatch.setattr(backend.net.generation_config, "eos_token_id", None)
    monkeypatch.setattr(backend, "eos_ids", set())
    [gen] = backend.generate([request])
    assert gen.truncated is True
    assert len(gen.tokens) == len(gen.token_logprobs) == limit
    [row] = rows
    assert len(row) == limit
    # positions whose token is new there: declared end-of-sequence, the model stops at it
    firsts = [k for k in range(1, limit) if row[k] not in row[:k]]
    assert firsts, row
    for k in {firsts[0], firsts[-1]}:
        monkeypatch.setattr(backend.net.generation_config, "eos_token_id", row[k])
        monkeypatch.setattr(backend, "eos_ids", {row[k]})
        [stopped] = backend.generate([request])
        assert stopped.truncated is False, k
        assert len(stopped.tokens) == len(stopped.token_logprobs) == k
        assert stopped.tokens == gen.tokens[:k]


def test_detector_records_and_bad_image(backend, tmp_path):
    good = tmp_path / "a.jpg"
    noise(300, 200).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    det = Detector(backend, batch_size=2)
    results = list(det.detect_many([str(good), str(bad), noise(64, 48), np.zeros((40, 80, 3), np.uint8)],
                                   classes=["cat", "dog"]))
    assert [r.error is None for r in results] == [True, False, True, True]
    assert str(bad) in results[1].error and "not an image" in results[1].error
    a = results[0]
    assert (a.width, a.height) == (300, 200)
    assert a.image == str(good)
    assert a.input_size == backend.frame((300, 200))
    assert a.model == backend.model and a.dialect == backend.dialect.name
    assert a.prompt and "cat, dog" in a.prompt
    assert a.generation.token_logprobs is not None
    json.loads(a.to_json())
    assert (results[3].width, results[3].height) == (80, 40)


def test_detect_raises_on_a_bad_image(backend):
    with pytest.raises(Exception, match="no such file"):
        Detector(backend).detect("/no/such.jpg", classes=["cat"])


def test_missing_model_is_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        LocalBackend(str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "nowhere" in message and "--model" in message and "\n" not in message
    assert "no such checkpoint directory" in message


@pytest.mark.parametrize("name", ["/models/Qwen2.5-VL-3B-Instruct", "./ckpt", "~/no/such/ckpt",
                                  "models/qwen/Qwen2.5-VL-3B"])
def test_a_path_that_does_not_exist_is_named_as_a_path(name):
    with pytest.raises(ModelLoadError, match="no such checkpoint directory"):
        LocalBackend(name)


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a checkpoint directory"):
        LocalBackend(str(tmp_path / "model.bin"))


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch):
    """huggingface_hub retries an unreachable hub for about 30 s; the backend asks once."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        LocalBackend("Qwen/Qwen2.5-VL-7B-Instrukt")
    assert time.perf_counter() - start < 10
    assert "not in the local cache" in str(info.value) and "\n" not in str(info.value)


def test_hub_offline_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    from grounding.backends import local

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(local, "hub_reachable", lambda *a: pytest.fail("probed the hub"))
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        LocalBackend("Qwen/Qwen2.5-VL-7B-Instrukt")


def test_a_reachable_hub_loads_online(monkeypatch):
    from huggingface_hub import constants

    from grounding.backends import local

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(local, "hub_reachable", lambda *a: True)
    assert local.resolve_model("Qwen/Qwen2.5-VL-7B-Instruct") == (
        "Qwen/Qwen2.5-VL-7B-Instruct", False)
    ckpt = str(tiny_checkpoint("qwen2.5-vl"))
    assert local.resolve_model(ckpt) == (ckpt, True)


def test_cli_detect_stdout_and_out_dir(tmp_path):
    ckpt = str(tiny_checkpoint("qwen2.5-vl"))
    a, b = tmp_path / "a.jpg", tmp_path / "b.png"
    noise(120, 90).save(a)
    noise(90, 120).save(b)
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    runner = CliRunner()
    out = runner.invoke(app, ["detect", str(a), str(b), "--classes", "cat,dog", "--model", ckpt,
                              "--max-new-tokens", "8", "--batch-size", "2"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["width"], r["height"]) for r in lines] == [(120, 90), (90, 120)]
    out_dir = tmp_path / "out"
    out = runner.invoke(app, ["detect", str(a), str(bad), "--prompt", "the red car", "--model",
                              ckpt, "--max-new-tokens", "8", "--out", str(out_dir)])
    assert out.exit_code == 1
    assert "1 of 2 images failed" in out.stderr
    assert json.loads((out_dir / "bad.json").read_text())["error"]
    with Image.open(out_dir / "a.jpg") as overlay:
        assert overlay.size == (120, 90)
    assert json.loads((out_dir / "a.json").read_text())["error"] is None


def test_cli_detect_bad_model_is_one_line(tmp_path):
    img = tmp_path / "a.jpg"
    noise(50, 50).save(img)
    out = CliRunner().invoke(app, ["detect", str(img), "--classes", "cat", "--model",
                                   str(tmp_path / "missing")])
    assert out.exit_code == 2
    assert out.stderr.count("\n") == 1 and "no such checkpoint directory" in out.stderr


def test_overlay_draws_on_the_box_and_displays_in_jupyter():
    image = Image.new("RGB", (200, 100), "white")
    result = Result(boxes=[Box((50.0, 20.0, 150.0, 80.0), "cat")], width=200, height=100)
    result.attach(image)
    drawn = np.asarray(result.annotate())
    assert drawn.shape == (100, 200, 3)
    changed = (drawn != 255).any(axis=2)
    assert changed[50, 49:52].any() and changed[50, 148:152].any()  # left and right edges
    assert not changed[60, 100] and not changed[5, 190]  # inside and far outside untouched
    png = result._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Result()._repr_png_() is None


def test_ontology_prompts_with_phrases_and_maps_to_classes():
    q = Query.make({"pedestrian": "person", "person": "person", "automobile": "car"})
    text = q.text("qwen3-vl")
    assert '"pedestrian, person, automobile"' in text
    assert q.classes.names == ["person", "car"]
    assert q.classes.match("pedestrians") == 0


@pytest.mark.parametrize("dialect", ["qwen2.5-vl", "qwen3-vl", "qwen2-vl", "qwen-vl", "deepseek-vl2"])
def test_every_dialect_has_prompts(dialect):
    boxes = Query.make(["cat"]).text(dialect)
    points = Query.make(["cat"], points=True).text(dialect)
    referring = Query.make(prompt="the cat on the left").text(dialect)
    assert "cat" in boxes and "cat" in points and "the cat on the left" in referring
    if dialect in ("qwen2.5-vl", "qwen3-vl"):
        assert "JSON" in boxes and "point" in points.lower()


def test_user_prompt_overrides_builtin():
    assert Query.make(["cat"], "Find all cats, JSON please").text("qwen2.5-vl") == "Find all cats, JSON please"


def test_cli_impossible_device_is_one_line(tmp_path):
    img = tmp_path / "a.jpg"
    noise(50, 50).save(img)
    out = CliRunner().invoke(app, ["detect", str(img), "--classes", "cat", "--model",
                                   str(tiny_checkpoint("qwen2.5-vl")), "--device", "cuda:1"])
    assert out.exit_code == 2
    assert out.stderr.count("\n") == 1 and "cuda:1" in out.stderr


def test_a_relative_file_name_is_a_file_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(ModelLoadError, match="not a checkpoint directory"):
        LocalBackend("README.md")


def test_a_directory_without_a_config_is_named_as_such(tmp_path):
    with pytest.raises(ModelLoadError, match="not a transformers checkpoint directory"):
        LocalBackend(str(tmp_path))


def test_bad_model_and_device_fail_before_the_heavy_imports(tmp_path):
    """No seconds of torch/transformers imports to learn that a name is mistyped."""
    import subprocess
    import sys

    missing, not_a_device = str(tmp_path / "missing"), str(tmp_path)
    code = ("import sys\nfrom grounding.backends.local import LocalBackend\n"
            f"for kw in ({{'model': {missing!r}}}, {{'model': {not_a_device!r}, "
            "'device': 'gpu'}):\n"
            "    try:\n        LocalBackend(**kw)\n    except Exception as e:\n"
            "        print(type(e).__name__, e)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "no such checkpoint directory" in out[0]
    assert "PlacementError" in out[1] and "'gpu'" in out[1]
    assert out[2] == "[]"
