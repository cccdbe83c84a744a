"""grounding.testing: tiny random Qwen-VL checkpoints that load with the real transformers code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import smart_resize
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from grounding.testing import (
    FAMILIES,
    QWEN_SPECIAL_TOKENS,
    TINY_SPECS,
    build_tiny_checkpoint,
    tiny_checkpoint,
)
from grounding.testing import tiny as testing

# The real checkpoints' preprocessor limits (Qwen2.5-VL-7B-Instruct, Qwen3-VL-*-Instruct).
REAL_LIMITS = {
    "qwen2.5-vl": {"model_type": "qwen2_5_vl", "patch": 14, "min": 3136, "max": 12845056},
    "qwen3-vl": {"model_type": "qwen3_vl", "patch": 16, "min": 65536, "max": 16777216},
}

SYSTEM_AND_IMAGE = [
    {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find cats"}]},
]


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class Loaded:
    def __init__(self, family: str, path: Path) -> None:
        self.family = family
        self.path = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory) -> Loaded:
    family = request.param
    path = build_tiny_checkpoint(tmp_path_factory.mktemp(family.replace(".", "_")), family)
    return Loaded(family, path)


def _prompt(loaded: Loaded) -> str:
    return loaded.processor.apply_chat_template(
        SYSTEM_AND_IMAGE, tokenize=False, add_generation_prompt=True)


def _generate(loaded: Loaded, images: list[Image.Image]) -> list[list[int]]:
    processor = loaded.processor
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=[_prompt(loaded)] * len(images), images=images, padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_loads_with_the_real_auto_classes(tiny: Loaded) -> None:
    real = REAL_LIMITS[tiny.family]
    assert AutoConfig.from_pretrained(tiny.path).model_type == real["model_type"]
    assert tiny.model.config.model_type == real["model_type"]
    assert type(tiny.model).__name__ in {"Qwen2_5_VLForConditionalGeneration",
                                         "Qwen3VLForConditionalGeneration"}
    assert type(tiny.processor).__name__ in {"Qwen2_5_VLProcessor", "Qwen3VLProcessor"}
    assert sum(p.numel() for p in tiny.model.parameters()) < 400_000
    text = tiny.model.config.text_config
    assert text.head_dim >= 32  # vLLM's CPU attention rejects head_dim 16
    assert text.hidden_size == text.num_attention_heads * text.head_dim
    assert tiny.model.config.vision_config.patch_size == real["patch"]


def test_tokenizer_and_special_tokens(tiny: Loaded) -> None:
    tok = tiny.processor.tokenizer
    ids = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(QWEN_SPECIAL_TOKENS)))  # Qwen's order
    assert ids[-1] == len(tok) - 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    config = tiny.model.config
    assert config.text_config.vocab_size >= len(tok)
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    gen = tiny.model.generation_config
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    # Byte-level: nothing is out of vocabulary, everything round-trips; digits split one by one.
    text = 'Find 1920 cats, é 漢字 😀\n[{"bbox_2d": [12, 34, 560, 78], "label": "cat"}]\t '
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.tokenize("2025") == ["2", "0", "2", "5"]
    special = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    assert tok.convert_ids_to_tokens(tok(special)["input_ids"])[:2] == ["<|im_start|>", "user"]
    assert tok(special)["input_ids"][-4:] == [ids[9], ids[12], ids[10], ids[2]]


def test_chat_template(tiny: Loaded) -> None:
    prompt = _prompt(tiny)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find cats<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    as_strings = [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Find cats"},
                  {"role": "assistant", "content": "none"}]
    assert tiny.processor.apply_chat_template(as_strings, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFind cats<|im_end|>\n"
        "<|im_start|>assistant\nnone<|im_end|>\n"
    )
    no_system = tiny.processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    if tiny.family == "qwen2.5-vl":  # Qwen2.5-VL's template adds a default system prompt
        assert no_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    else:
        assert no_system == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # With the image in the message and tokenize=True, the processor expands the pad tokens.
    image = _image(200, 150, 0)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Find cats"}]}]
    enc = tiny.processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             add_generation_prompt=True, return_tensors="pt")
    n_pads = int((enc["input_ids"] == tiny.model.config.image_token_id).sum())
    assert n_pads == int(enc["image_grid_thw"][0].prod()) // 4 > 1


@pytest.mark.parametrize("size", [(640, 480), (200, 150)])
def test_model_frame_equals_qwen_vl_utils(tiny: Loaded, size: tuple[int, int]) -> None:
    real = REAL_LIMITS[tiny.family]
    spec = TINY_SPECS[tiny.family]
    assert (spec.patch_size, spec.min_pixels, spec.max_pixels) == (
        real["patch"], real["min"], real["max"])
    width, height = size
    inputs = tiny.processor(text=[_prompt(tiny)], images=[_image(width, height, 1)],
                            return_tensors="pt")
    grid = inputs["image_grid_thw"][0].tolist()
    frame = (grid[1] * real["patch"], grid[2] * real["patch"])  # (height, width)
    assert grid[0] == 1
    assert frame == smart_resize(height, width, factor=2 * real["patch"],
                                 min_pixels=real["min"], max_pixels=real["max"])
    n_pads = int((inputs["input_ids"] == tiny.model.config.image_token_id).sum())
    assert n_pads == grid[1] * grid[2] // 4


def test_generate_is_deterministic(tiny: Loaded) -> None:
    image = _image(640, 480, 2)
    first = _generate(tiny, [image])
    assert len(first[0]) == 8 or tiny.processor.tokenizer.eos_token_id in first[0]
    assert _generate(tiny, [image]) == first


def test_left_padded_batch_matches_one_at_a_time(tiny: Loaded) -> None:
    images = [_image(640, 480, 3), _image(200, 150, 4)]
    singles = [_generate(tiny, [image])[0] for image in images]
    batch = _generate(tiny, images)
    assert batch == singles


def test_same_seed_same_bytes(tiny: Loaded, tmp_path: Path) -> None:
    family = tiny.family
    again = build_tiny_checkpoint(tmp_path / "again", family, seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (again / name).read_bytes() == (tiny.path / name).read_bytes(), name
    other = build_tiny_checkpoint(tmp_path / "other", family, seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_small_on_disk(tiny: Loaded) -> None:
    total = sum(f.stat().st_size for f in tiny.path.rglob("*") if f.is_file())
    assert total < 3 * 1024 * 1024
    names = {f.name for f in tiny.path.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= names
    assert json.loads((tiny.path / "config.json").read_text())["model_type"] == \
        REAL_LIMITS[tiny.family]["model_type"]


def test_build_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path, "qwen3-vl", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_family_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_checkpoint(tmp_path, "qwen9-vl")  # type: ignore[arg-type]


def test_tiny_checkpoint_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_checkpoint("qwen2.5-vl", cache_dir=tmp_path)
    assert first.parent == tmp_path
    assert "qwen2.5-vl" in first.name
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached checkpoint")

    monkeypatch.setattr(testing, "build_tiny_checkpoint", no_build)
    assert tiny_checkpoint("qwen2.5-vl", cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert (first / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left behind
    assert AutoConfig.from_pretrained(first).model_type == "qwen2_5_vl"


def test_tiny_checkpoint_race_loser_uses_the_winner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishes first, between our check and our rename: use its build."""
    real_build = testing.build_tiny_checkpoint
    finals: list[Path] = []

    def build_and_publish_first(path, family, *, seed=0, vocab_size=None):
        out = real_build(path, family, seed=seed)
        # The winner publishes a complete checkpoint at the final name before our rename.
        final = Path(path).parent / testing._cache_key(family, seed)
        shutil.copytree(out, final)
        finals.append(final)
        return out

    monkeypatch.setattr(testing, "build_tiny_checkpoint", build_and_publish_first)
    got = tiny_checkpoint("qwen3-vl", cache_dir=tmp_path)
    assert finals == [got]
    assert [p.name for p in tmp_path.iterdir()] == [got.name]  # the loser's temp dir is gone
    assert AutoConfig.from_pretrained(got).model_type == "qwen3_vl"
