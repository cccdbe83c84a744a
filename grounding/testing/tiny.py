"""Tiny random-weight Qwen-VL checkpoints for tests, built offline in a few seconds.

``build_tiny_checkpoint(dir, "qwen2.5-vl")`` writes a checkpoint directory of about 1 MB
that the real transformers code path loads back::

    processor = AutoProcessor.from_pretrained(dir)
    model = AutoModelForImageTextToText.from_pretrained(dir)

The architecture is the real one (``qwen2_5_vl`` / ``qwen3_vl``), shrunk: 2 text layers of
width 64, a 2-layer vision tower of width 32. The tokenizer is a byte-level BPE trained
here on a small generated corpus (every string tokenizes: no text is out of vocabulary)
with the 14 Qwen special tokens appended in Qwen's order, and a chat template equivalent
to Qwen's. The image processor keeps the real checkpoints' patch size and pixel limits, so
the model frame (``image_grid_thw[1:] * patch_size``) is the one the real model sees.

Weights are random: generated text is garbage (often not even valid UTF-8). Test shapes,
frames, batching and plumbing, never the text. Nothing here is downloaded.

``tiny_checkpoint(family)`` builds one once per (family, seed, grounding version,
transformers version, this file's contents) into a cache folder and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FAMILIES",
    "QWEN_SPECIAL_TOKENS",
    "TINY_SAM2_IMAGE_SIZE",
    "TINY_SPECS",
    "Family",
    "TinySpec",
    "build_tiny_checkpoint",
    "build_tiny_sam2",
    "chat_template",
    "tiny_checkpoint",
    "tiny_sam2",
]

Family = Literal["qwen2.5-vl", "qwen3-vl"]
FAMILIES: tuple[Family, ...] = ("qwen2.5-vl", "qwen3-vl")

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen's special tokens, in the order of their ids (151643.. in the real vocabulary)."""

# Qwen2's pre-tokenizer split: contractions, letter runs, ONE digit per token, punctuation
# runs, newlines, spaces. Same as transformers.models.qwen2.tokenization_qwen2.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_BPE_VOCAB_SIZE = 512  # 256 byte tokens + 256 merges, before the special tokens
_VOCAB_MULTIPLE = 64  # the model's vocab_size is padded up to a multiple of this


class TinySpec:
    """What a family's tiny checkpoint looks like (the real checkpoints' preprocessing)."""

    def __init__(self, *, model_type: str, patch_size: int, min_pixels: int, max_pixels: int,
                 image_mean: tuple[float, float, float], image_std: tuple[float, float, float],
                 default_system: str | None) -> None:
        self.model_type = model_type
        self.patch_size = patch_size
        self.merge_size = 2
        self.temporal_patch_size = 2
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = image_mean
        self.image_std = image_std
        self.default_system = default_system

    @property
    def factor(self) -> int:
        """The side multiple of the model frame: patch_size * merge_size (28 or 32)."""
        return self.patch_size * self.merge_size

    def __repr__(self) -> str:
        return (f"TinySpec(model_type={self.model_type!r}, patch_size={self.patch_size}, "
                f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels})")


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_SPECS: dict[str, TinySpec] = {
    # As Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json (and qwen-vl-utils' defaults).
    "qwen2.5-vl": TinySpec(
        model_type="qwen2_5_vl", patch_size=14, min_pixels=3136, max_pixels=12845056,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        default_system="You are a helpful assistant.",
    ),
    # As Qwen/Qwen3-VL-*-Instruct's preprocessor_config.json.
    "qwen3-vl": TinySpec(
        model_type="qwen3_vl", patch_size=16, min_pixels=65536, max_pixels=16777216,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        default_system=None,
    ),
}

# Equivalent to Qwen2.5-VL's chat template (Qwen3-VL's, without tools, when no default
# system prompt is given). All literal text goes through {{- '...' -}} expressions: the
# whitespace-control dashes then strip only the template's own layout, never output.
_CHAT_TEMPLATE = """
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' and default_system -%}
        {{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for content in message['content'] -%}
            {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Picture ' + image_count.value | string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif content['type'] == 'video' or 'video' in content -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Video ' + video_count.value | string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in content -%}
                {{- content['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


def chat_template(family: Family) -> str:
    """The tiny checkpoint's Jinja chat template for ``family``."""
    spec = _spec(family)
    if spec.default_system is None:
        prefix = "{%- set default_system = none -%}"
    else:
        prefix = "{%- set default_system = " + repr(spec.default_system) + " -%}"
    return prefix + _CHAT_TEMPLATE


def _spec(family: str) -> TinySpec:
    try:
        return TINY_SPECS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}") from None


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

_WORDS_TEXT = (
    "the a an of and to in on at with for from by is are was be this that it as or not "
    "you your we our they their he she his her its there here what which who where when "
    "how all any each every some no one two three four five six seven eight nine ten "
    "image picture photo frame scene object objects region box boxes point points label "
    "labels class classes detect detection find locate ground grounding output answer "
    "person people man woman child car truck bus bicycle motorcycle dog cat bird horse "
    "sheep cow bottle cup chair table couch bed tv laptop phone book clock vase plant "
    "left right top bottom center middle above below near far small large red green blue "
    "black white yellow please return json list format coordinates bbox width height "
    "helpful assistant system user question describe count there none visible"
)
_WORDS = tuple(_WORDS_TEXT.split())

_KEYS = ("bbox_2d", "point_2d", "label", "bbox", "box", "points", "sub_label", "type")


def _corpus() -> list[str]:
    """A small fixed corpus: English words, grounding JSON, numbers, code-ish punctuation.

    Independent of the seed: the tokenizer of every tiny checkpoint is the same.
    """
    rng = random.Random(20250101)
    lines: list[str] = []
    for _ in range(600):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice((".", "?", "!", ":", ",")))
    for _ in range(600):
        key = rng.choice(_KEYS)
        label = rng.choice(_WORDS)
        nums = ", ".join(str(rng.randint(0, 1999)) for _ in range(4))
        lines.append(f'[{{"{key}": [{nums}], "label": "{label}"}}]')
        lines.append(f"```json\n[\n  {{\"{key}\": [{nums}], \"label\": \"{label}\"}}\n]\n```")
        lines.append(f"<ref>{label}</ref><box>({nums.replace(', ', ',')[:9]}),(1,2)</box>")
    for line in lines[:300]:
        lines.append(f"system\nYou are a helpful assistant.\nuser\n{line}\nassistant\n")
    return lines


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges, trained on ``_corpus()`` (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges: list[tuple[str, str]] = [
        (m.split(" ", 1)[0], m.split(" ", 1)[1]) if isinstance(m, str) else (m[0], m[1])
        for m in model["merges"]
    ]
    # The ids must be 0..n-1 with no gaps for the specials to follow directly.
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("trained BPE vocabulary ids are not contiguous")
    return vocab, merges


def _build_tokenizer() -> Any:
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe()
    n = len(vocab)
    vocab = {**vocab, **{t: n + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # As the real Qwen tokenizer_config.json: every special but <|endoftext|>.
        extra_special_tokens=[
            AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[1:]
        ],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    if ids != list(range(n, n + len(QWEN_SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} are not {n}..{n + 13}")
    return tokenizer


# --------------------------------------------------------------------------------------
# Model config, processor
# --------------------------------------------------------------------------------------

def _config(family: Family, tokenizer: Any, vocab_size: int | None = None) -> Any:
    """A tiny ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` wired to ``tokenizer``'s ids."""
    spec = _spec(family)
    ids = dict(zip(QWEN_SPECIAL_TOKENS,
                   tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)), strict=True))
    padded = -(-len(tokenizer) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    if vocab_size is not None and vocab_size < padded:
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {padded} rows")
    vocab_size = vocab_size or padded
    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        # head_dim 32: vLLM's CPU attention rejects head_dim 16.
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "dtype": "float32",
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 1,  # head_dim 32
        "in_channels": 3,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "out_hidden_size": text["hidden_size"],
    }
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 1000000.0,
            "mrope_section": [4, 6, 6],  # sums to head_dim / 2
        }
        text["use_sliding_window"] = False
        vision.update(hidden_act="silu", window_size=112, fullatt_block_indexes=[1],
                      tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                tie_word_embeddings=False, **token_ids)

    from transformers import Qwen3VLConfig

    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 5000000.0,
        # Interleaved: H and W take every third frequency up to 3 * section; sums to
        # head_dim / 2 with 3 * 5 <= 16 (the real [24, 20, 20] scaled to head_dim 32).
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    }
    vision.update(hidden_act="gelu_pytorch_tanh",
                  num_position_embeddings=144,  # a perfect square: a 12 x 12 grid
                  deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision,
                         tie_word_embeddings=False, **token_ids)


def _processor(family: Family, tokenizer: Any) -> Any:
    spec = _spec(family)
    common = {
        "do_resize": True,
        "resample": 3,  # bicubic, as the real checkpoints
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
        "do_convert_rgb": True,
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.merge_size,
    }
    image_size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(size=image_size, **common)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(
            size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, **common)
        processor_cls = Qwen2_5_VLProcessor
    else:
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video_processor = Qwen3VLVideoProcessor(
            size={"shortest_edge": 4096, "longest_edge": 25165824}, fps=2, **common)
        processor_cls = Qwen3VLProcessor
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                         video_processor=video_processor, chat_template=chat_template(family))


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def build_tiny_checkpoint(path: str | Path, family: Family = "qwen2.5-vl", *,
                          seed: int = 0, vocab_size: int | None = None) -> Path:
    """Write a tiny random-weight ``family`` checkpoint into directory ``path``; return it.

    Deterministic: the same ``seed`` gives byte-identical weights and the same tokenizer.
    The directory is created if needed; files already there are overwritten.
    ``vocab_size`` pads the embedding and output rows (e.g. to Qwen's 151,936) so that
    memory costs that scale with the vocabulary show on the CPU; the extra rows are never
    produced by the tokenizer but are scored at every step, as in the real model.
    """
    spec = _spec(family)
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    config = _config(family, tokenizer, vocab_size)
    if config.model_type != spec.model_type:
        raise RuntimeError(f"built a {config.model_type} config for {family}")

    # A private generator state: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.eval()

    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)

    model.save_pretrained(out, safe_serialization=True)
    _processor(family, tokenizer).save_pretrained(out)
    return out


def tiny_checkpoint(family: Family = "qwen2.5-vl", cache_dir: str | Path | None = None, *,
                    seed: int = 0, vocab_size: int | None = None) -> Path:
    """The tiny ``family`` checkpoint, built on first use and then reused.

    It lives in ``cache_dir`` (default: a folder under the system temp dir) in a
    sub-folder keyed by family, seed, grounding's and transformers' versions and a hash of
    this file, so a changed builder or library never reuses a stale checkpoint. Safe when
    several processes ask at once: each builds into a private temp dir, and the first
    rename wins; the others discard theirs and use the winner's.
    """
    key = _cache_key(family, seed) + (f"-vocab{vocab_size}" if vocab_size else "")
    root = Path(cache_dir) if cache_dir is not None else (
        Path(tempfile.gettempdir()) / "grounding-tiny-checkpoints")
    final = root / key
    if _complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        build_tiny_checkpoint(tmp, family, seed=seed, vocab_size=vocab_size)
        # model.safetensors is written 0600 and mkdtemp makes a 0700 dir: let others read.
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not _complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _cache_key(family: Family, seed: int) -> str:
    _spec(family)
    import transformers

    from grounding._version import __version__

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    return (f"tiny-{family}-seed{seed}-grounding{__version__}"
            f"-transformers{transformers.__version__}-{digest}")


_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                   "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED_FILES)


# --------------------------------------------------------------------------------------
# Tiny SAM 2 (box-prompted segmenter)
# --------------------------------------------------------------------------------------

TINY_SAM2_IMAGE_SIZE = 256
"""The tiny SAM 2's square input side (the real checkpoints use 1024); low-res masks are
a quarter of it (64 x 64, as 256 x 256 for the real ones)."""

_SAM2_REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json")


def _sam2_config(size: int = TINY_SAM2_IMAGE_SIZE) -> Any:
    """A tiny ``Sam2Config``: a 5-block Hiera of widths 8..64, FPN width 32, decoder 32.

    The layout is the real one shrunk: 4 stages with 3 query-pool stages (features at
    size/4, size/8, size/16), windowed attention with one global block, a 2-layer
    two-way transformer in the mask decoder. About 124k parameters, 0.5 MB on disk.
    """
    from transformers import Sam2Config

    if size % 16:
        raise ValueError(f"SAM 2 image size {size} is not a multiple of 16")
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 8,
        "num_attention_heads": 1,
        "image_size": [size, size],
        "blocks_per_stage": [1, 1, 2, 1],
        "embed_dim_per_stage": [8, 16, 32, 64],
        "num_attention_heads_per_stage": [1, 1, 1, 1],
        "window_size_per_stage": [8, 4, 4, 4],
        # A global block may not open a pooled stage (its window is 0): block 3 is the
        # second block of stage 3.
        "global_attention_blocks": [3],
        "window_positional_embedding_background_size": [4, 4],
    }
    vision = {
        "model_type": "sam2_vision_model",
        "backbone_config": backbone,
        "backbone_channel_list": [64, 32, 16, 8],
        "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
        "fpn_hidden_size": 32,
    }
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 32, "image_size": size, "patch_size": 16},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                             "iou_head_hidden_dim": 32},
    )


def build_tiny_sam2(path: str | Path, *, seed: int = 0,
                    size: int = TINY_SAM2_IMAGE_SIZE) -> Path:
    """Write a tiny random-weight SAM 2 checkpoint (model + ``Sam2Processor``) to ``path``.

    ``Sam2Model.from_pretrained(path)`` and ``Sam2Processor.from_pretrained(path)`` (or
    the Auto classes) load it back offline. The processor resizes to ``size`` x ``size``
    (ImageNet mean/std, bilinear, as the real checkpoints). Deterministic in ``seed``;
    the caller's global RNG is left as it was. Random weights: masks and scores are
    meaningless; test shapes, frames, batching and accounting.
    """
    import torch
    from transformers import Sam2ImageProcessor, Sam2Model, Sam2Processor

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = _sam2_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2Model(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Sam2ImageProcessor(
        size={"height": size, "width": size},
        mask_size={"height": size // 4, "width": size // 4},
    )
    Sam2Processor(image_processor=image_processor).save_pretrained(out)
    return out


def tiny_sam2(path: str | Path | None = None, *, seed: int = 0,
              cache_dir: str | Path | None = None) -> Path:
    """The tiny SAM 2 checkpoint: built into ``path`` when given, else built once into a
    cache folder (keyed as :func:`tiny_checkpoint`'s, process-safe) and reused."""
    if path is not None:
        return build_tiny_sam2(path, seed=seed)
    key = _cache_key_for("sam2", seed)
    root = Path(cache_dir) if cache_dir is not None else (
        Path(tempfile.gettempdir()) / "grounding-tiny-checkpoints")
    final = root / key
    if _sam2_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        build_tiny_sam2(tmp, seed=seed)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _sam2_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _cache_key_for(name: str, seed: int) -> str:
    import transformers

    from grounding._version import __version__

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    return (f"tiny-{name}-seed{seed}-grounding{__version__}"
            f"-transformers{transformers.__version__}-{digest}")


def _sam2_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _SAM2_REQUIRED_FILES)
