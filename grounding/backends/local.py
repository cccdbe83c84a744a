"""Qwen2/2.5/3-VL in this process through transformers."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import time
from typing import Any

from PIL import Image

from grounding.backends.base import TOP_LOGPROBS, Generation, Request
from grounding.dialects import Dialect, get_dialect
from grounding.errors import GeometryError, GroundingError
from grounding.geometry import Size, model_frame, resolve_budget

log = logging.getLogger("grounding")

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_MAX_NEW_TOKENS = 2048
"""A Qwen2.5-VL box line is about 30 tokens: 2048 leaves room for about 60 boxes."""


class ModelLoadError(GroundingError):
    """The weights could not be had; the message says what to do."""


def _load_hint(model: str, exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"cannot load model {model!r}: {text}. If it is a hub id, check the spelling, run "
        "`hf auth login` for gated models and make sure the hub is reachable (or download "
        "it with `hf download`); otherwise point --model at a local checkpoint directory."
    )


class LocalBackend:
    """Holds one loaded model and processor; see :class:`grounding.backends.Backend`.

    GPU defaults: bf16 where supported (else fp16), ``device_map="auto"``, flash-attention
    2 when installed, else sdpa. On CPU it runs in float32, slowly, after a warning.
    The pixel budget (``min_pixels``/``max_pixels``) defaults to the dialect's
    ``budget`` (README: "Pixel budget"); the processor is told not to resize again, and the
    frame it reports is checked against the one grounding predicted.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dialect: str | Dialect | None = None,
        device: str | None = None,
        dtype: Any = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        attn_implementation: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        self.model = str(model)
        try:
            config = AutoConfig.from_pretrained(self.model)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(_load_hint(self.model, exc)) from None
        try:
            self.dialect = get_dialect(dialect or config.model_type)
        except ValueError:
            raise ModelLoadError(
                f"model {self.model!r} is a {config.model_type!r}, not a grounding dialect; "
                "pass --dialect to say how it writes boxes"
            ) from None
        if self.dialect.factor is None:
            raise ModelLoadError(f"the local backend runs Qwen2/2.5/3-VL; {self.dialect.name} "
                                 "models are reached through a server (--backend openai)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            log.warning("grounding: no GPU found, running %s on the CPU (slow)", self.model)
        if dtype is None:
            if device.startswith("cuda"):
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.float32
        if attn_implementation is None:
            flash = importlib.util.find_spec("flash_attn") is not None
            attn_implementation = "flash_attention_2" if flash and device != "cpu" else "sdpa"
        try:
            self.processor = AutoProcessor.from_pretrained(self.model)
            self.net = AutoModelForImageTextToText.from_pretrained(
                self.model, dtype=dtype, attn_implementation=attn_implementation,
                device_map="auto" if device.startswith("cuda") else None,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(_load_hint(self.model, exc)) from None
        if not device.startswith("cuda"):
            self.net.to(device)
        self.net.eval()
        self.device = device
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.patch_size = int(self.processor.image_processor.patch_size)
        self.min_pixels, self.max_pixels = resolve_budget(self.dialect, min_pixels, max_pixels)
        self.max_new_tokens = max_new_tokens
        generation = self.net.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else []
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos)
        self.eos_ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.pad_id = tokenizer.pad_token_id

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def frame(self, image_size: Size) -> Size:
        return model_frame(self.dialect, *image_size, min_pixels=self.min_pixels,
                           max_pixels=self.max_pixels)

    def _chat(self, request: Request) -> str:
        messages: list[dict] = []
        if request.system:
            messages.append({"role": "system",
                             "content": [{"type": "text", "text": request.system}]})
        images = [{"type": "image"}] * (len(request.references) + 1)
        messages.append({"role": "user",
                         "content": [*images, {"type": "text", "text": request.prompt}]})
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, requests: list[Request]) -> list[Generation | Exception]:
        if not requests:
            return []
        try:
            return list(self._generate(requests))
        except Exception as exc:  # isolate the failing request
            if len(requests) == 1:
                return [exc]
            log.warning("grounding: batch of %d failed (%s); retrying one by one",
                        len(requests), exc)
            return [self.generate([r])[0] for r in requests]

    def _generate(self, requests: list[Request]) -> list[Generation]:
        import torch

        t0 = time.perf_counter()
        # Every image of every request in message order: a request's references, then its
        # image, whose frame (the last of its group) the coordinates refer to.
        shown = [image for r in requests for image in (*r.references, r.image)]
        frames = [self.frame(image.size) for image in shown]
        images = [im if im.size == f else im.resize(f, Image.Resampling.BICUBIC)
                  for im, f in zip(shown, frames, strict=True)]
        inputs = self.processor(text=[self._chat(r) for r in requests], images=images,
                                padding=True, return_tensors="pt", do_resize=False)
        grids = [(int(g[2]) * self.patch_size, int(g[1]) * self.patch_size)
                 for g in inputs["image_grid_thw"]]
        for frame, got in zip(frames, grids, strict=True):
            if frame != got:
                raise GeometryError(f"the processor produced a {got[0]}x{got[1]} frame where "
                                    f"{frame[0]}x{frame[1]} was expected")
        ends = itertools.accumulate(len(r.references) + 1 for r in requests)
        seen = [grids[end - 1] for end in ends]
        inputs = inputs.to(self.net.device)
        t1 = time.perf_counter()
        limit = max(r.max_new_tokens or self.max_new_tokens for r in requests)
        with torch.inference_mode():
            out = self.net.generate(
                **inputs, max_new_tokens=limit, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
                pad_token_id=self.pad_id,
            )
        t2 = time.perf_counter()
        new = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()
        all_logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).cpu()
        logprobs = all_logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        top_values, top_ids = all_logprobs.topk(TOP_LOGPROBS, dim=-1)
        results = []
        for b, (row, request, frame) in enumerate(zip(new.tolist(), requests, seen,
                                                      strict=True)):
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            ids = row if stop is None else row[:stop]
            top = [
                {self._token_text(t): v for t, v in zip(top_ids[b, i].tolist(),
                                                         top_values[b, i].tolist(), strict=True)}
                for i in range(len(ids))
            ]
            results.append(Generation(
                text=self.tokenizer.decode(ids, skip_special_tokens=False),
                input_size=frame,
                truncated=stop is None and len(row) >= (request.max_new_tokens or
                                                         self.max_new_tokens),
                tokens=[self._token_text(t) for t in ids],
                token_logprobs=logprobs[b, : len(ids)].tolist(),
                top_logprobs=top,
            ))
        t3 = time.perf_counter()
        n = len(requests)
        for g in results:
            g.timings = {"preprocess": (t1 - t0) / n, "generate": (t2 - t1) / n,
                         "decode": (t3 - t2) / n}
        return results
