"""Qwen2/2.5/3-VL in this process through transformers."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from PIL import Image

from grounding.backends.base import (
    TOP_LOGPROBS,
    BackendSpec,
    Generation,
    Request,
    alternatives,
)
from grounding.backends.options import DEFAULT_MODEL as DEFAULT_MODEL  # re-exported
from grounding.backends.options import LocalOptions
from grounding.backends.placement import Machine, check_device, plan
from grounding.core.dialects import Dialect, get_dialect
from grounding.core.errors import GeometryError, GroundingError
from grounding.core.geometry import Size, model_frame, resolve_budget
from grounding.core.repetition import check_repeats

log = logging.getLogger("grounding")


class ModelLoadError(GroundingError):
    """The weights could not be had; the message says what to do."""


class GPUOutOfMemory(GroundingError):
    """One image alone does not fit in GPU memory."""

    def __init__(self) -> None:
        super().__init__("out of GPU memory: lower --max-pixels or --batch-size")


HUB_PROBE_TIMEOUT = 3.0
"""Seconds to wait for the hub before loading from the local cache only (instead of
huggingface_hub's retries, about 30 s when the hub cannot be reached)."""


def _load_hint(model: str, exc: BaseException) -> str:
    text = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(".")
    return (
        f"cannot load model {model!r}: {text}. If it is a hub id, check the spelling, run "
        "`hf auth login` for gated models and make sure the hub is reachable (or download "
        "it with `hf download`); otherwise point --model at a local checkpoint directory."
    )


def looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a directory."""
    return (model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
            or os.path.isabs(model))


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """One request to the hub with no retries (the hub's own session: proxies apply)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS, refused, timeout, proxy: all mean "not now"
        return False
    return True


def resolve_model(model: str) -> tuple[str, bool]:
    """(what from_pretrained gets, local_files_only) for ``--model``.

    A path-like name that is not a directory fails at once ("no such checkpoint
    directory"), rather than as a malformed hub id. A hub id is loaded from the local
    cache only when the hub is offline (HF_HUB_OFFLINE) or does not answer within
    HUB_PROBE_TIMEOUT; an id not cached then fails in one line."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path, True
    if os.path.exists(path):
        raise ModelLoadError(f"--model {model}: not a checkpoint directory (a file)")
    if looks_like_path(model):
        raise ModelLoadError(f"--model {model}: no such checkpoint directory")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return model, True
    return model, not hub_reachable()


def load_config(auto_config: Any, model: str, source: str, offline: bool, *,
                option: str = "--model", what: str = "model",
                hint: Callable[[str, BaseException], str] | None = None) -> Any:
    """The transformers config of ``model`` (resolved to ``source``), or ModelLoadError
    in one line naming ``option``: a directory without a readable config.json, a model
    not in the cache while the hub is out of reach, anything else with ``hint``."""
    try:
        return auto_config.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError, KeyError) as exc:
        if os.path.isdir(source):
            raise ModelLoadError(f"{option} {model}: not a transformers checkpoint "
                                 "directory (no readable config.json)") from None
        if offline:
            raise ModelLoadError(
                f"cannot load {what} {model!r}: it is not in the local cache and the hub is "
                "offline or unreachable; download it where the hub is reachable "
                f"(`hf download {model}`) or point {option} at a checkpoint directory"
            ) from None
        raise ModelLoadError((hint or _load_hint)(model, exc)) from None


def _dialect(model: str, dialect: str | Dialect | None, source: str, offline: bool) -> Dialect:
    """The dialect the local backend runs ``model`` in: ``dialect``, else the checkpoint's
    model type; ModelLoadError when that is no dialect or one the local backend cannot run."""
    from transformers import AutoConfig

    config = load_config(AutoConfig, model, source, offline)
    try:
        found = get_dialect(dialect or config.model_type)
    except ValueError:
        raise ModelLoadError(
            f"model {model!r} is a {config.model_type!r}, not a grounding dialect; "
            "pass --dialect to say how it writes boxes"
        ) from None
    if found.factor is None:
        raise ModelLoadError(f"the local backend runs Qwen2/2.5/3-VL; {found.name} "
                             "models are reached through a server (--backend openai)")
    return found


class LocalBackend:
    """Holds one loaded model and processor; see :class:`grounding.backends.Backend`.

    Placement (device, dtype, attention, weight map) is decided by
    :func:`grounding.backends.placement.plan`: the first GPU in bf16 (fp16 where bf16 is
    missing) with flash-attention 2 when installed, else sdpa; float32 on the CPU, slowly,
    after a warning. The pixel budget (``min_pixels``/``max_pixels``) defaults to the
    dialect's ``budget`` (README: "Pixel budget"); the processor is told not to resize
    again, and the frame it reports is checked against the one grounding predicted.

    A batch that runs out of GPU memory is split in halves, down to one image, and later
    batches are capped at the size that fitted; an image that does not fit alone is that
    request's :class:`GPUOutOfMemory` error.

    A row that degenerates into writing one object text ``stop_repeats`` times in a row
    (grounding.core.repetition) is stopped there (token_scores.RepetitionStop) while the
    rest of the batch runs on: its Generation holds what it wrote up to the stop, with
    ``repetition`` set and ``truncated`` not: it stopped before the token limit, which
    would only have let it write more copies.
    """

    def __init__(
        self,
        model: str = LocalOptions.model,
        *,
        dialect: str | Dialect | None = LocalOptions.dialect,
        device: str | None = LocalOptions.device,
        dtype: Any = None,
        min_pixels: int | None = LocalOptions.min_pixels,
        max_pixels: int | None = LocalOptions.max_pixels,
        max_new_tokens: int = LocalOptions.max_new_tokens,
        stop_repeats: int = LocalOptions.stop_repeats,
        attn_implementation: str | None = None,
        scores: bool = True,
    ) -> None:
        self.model = str(model)
        check_repeats(stop_repeats)
        # What can be checked without torch and transformers (seconds to import) first.
        check_device(device)
        source, offline = resolve_model(self.model)
        self.placement = plan(Machine.probe(), device, dtype, attn_implementation)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from grounding.backends.token_scores import TokenTexts

        self.dialect = _dialect(self.model, dialect, source, offline)
        if not self.placement.on_gpu:
            log.warning("grounding: no GPU in use, running %s on the CPU (slow)", self.model)
        try:
            self.processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
            self.net = AutoModelForImageTextToText.from_pretrained(
                source, local_files_only=offline, dtype=self.placement.torch_dtype(),
                attn_implementation=self.placement.attn_implementation,
                device_map=self.placement.device_map,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(_load_hint(self.model, exc)) from None
        self.net.eval()
        self.device = self.placement.device
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.patch_size = int(self.processor.image_processor.patch_size)
        self.min_pixels, self.max_pixels = resolve_budget(self.dialect, min_pixels, max_pixels)
        self.max_new_tokens = max_new_tokens
        self.stop_repeats = stop_repeats
        """Stop a row once it ends in this many copies of one object text (0: never)."""
        self._digit_ids: frozenset[int] | None = None
        self.scores = scores
        """Record each step's log-probabilities (confidences, --verify); False skips it."""
        self.batch_cap: int | None = None
        """Set after an out-of-memory: the largest batch that fitted."""
        generation = self.net.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else []
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos)
        self.eos_ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.pad_id = tokenizer.pad_token_id

    @staticmethod
    def describe(model: str = LocalOptions.model, *,
                 dialect: str | Dialect | None = LocalOptions.dialect,
                 min_pixels: int | None = LocalOptions.min_pixels,
                 max_pixels: int | None = LocalOptions.max_pixels,
                 max_new_tokens: int = LocalOptions.max_new_tokens,
                 stop_repeats: int = LocalOptions.stop_repeats, **_: Any) -> BackendSpec:
        """What ``LocalBackend(model, ...)`` would be, read from the checkpoint's config
        alone (no weights, no device): a driver that plans and records a run whose model
        runs elsewhere (the Ray engine's workers) needs the dialect and pixel budget, and
        must fail here, in one line, on a model that cannot be had. Options that only
        place the model (device, dtype) are ignored."""
        check_repeats(stop_repeats)
        source, offline = resolve_model(str(model))
        found = _dialect(str(model), dialect, source, offline)
        low, high = resolve_budget(found, min_pixels, max_pixels)
        return BackendSpec(model=str(model), dialect=found, min_pixels=low, max_pixels=high,
                           max_new_tokens=max_new_tokens, stop_repeats=stop_repeats)

    @property
    def digit_ids(self) -> frozenset[int]:
        """The token ids whose text holds a digit (a repeated object must), read from the
        vocabulary on first use."""
        if self._digit_ids is None:
            from grounding.backends.token_scores import digit_ids

            self._digit_ids = digit_ids(self.tokenizer)
        return self._digit_ids

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
        cap = self.batch_cap or len(requests)
        if len(requests) > cap:
            return [g for start in range(0, len(requests), cap)
                    for g in self.generate(requests[start:start + cap])]
        import torch

        try:
            return list(self._generate(requests))
        except torch.cuda.OutOfMemoryError:
            _free_gpu_memory()
            if len(requests) == 1:
                return [GPUOutOfMemory()]
            half = (len(requests) + 1) // 2
            self.batch_cap = half if self.batch_cap is None else min(self.batch_cap, half)
            log.warning("grounding: out of GPU memory on a batch of %d; batches are now at "
                        "most %d", len(requests), self.batch_cap)
            return self.generate(requests[:half]) + self.generate(requests[half:])
        except Exception as exc:  # isolate the failing request
            if len(requests) == 1:
                return [exc]
            log.warning("grounding: batch of %d failed (%s); retrying one by one",
                        len(requests), exc)
            return [self.generate([r])[0] for r in requests]

    def _generate(self, requests: list[Request]) -> list[Generation]:
        import torch

        from grounding.backends.token_scores import RepetitionStop, RowLimits, StepRecorder

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
        inputs = inputs.to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        limits = [r.max_new_tokens or self.max_new_tokens for r in requests]
        criteria: list[Any] = [RowLimits(prompt_length, limits)]
        repetition = None
        if self.stop_repeats:
            repetition = RepetitionStop(prompt_length, limits, repeats=self.stop_repeats,
                                        digits=self.digit_ids,
                                        ends=self.eos_ids | {self.pad_id} - {None})
            criteria.append(repetition)
        t1 = time.perf_counter()
        recorder = StepRecorder(self.net, TOP_LOGPROBS) if self.scores else nullcontext()
        with torch.inference_mode(), recorder:
            out = self.net.generate(
                **inputs, max_new_tokens=max(limits), do_sample=False,
                logits_processor=[recorder] if self.scores else None,
                stopping_criteria=criteria,
                pad_token_id=self.pad_id,
            )
        t2 = time.perf_counter()
        new = out[:, prompt_length:].cpu()
        logprobs, top_values, top_ids = recorder.result(out) if self.scores else (None,) * 3
        stopped = repetition.stopped if repetition is not None else {}
        results = []
        for b, (row, limit, frame) in enumerate(zip(new.tolist(), limits, seen, strict=True)):
            row = row[:limit]
            if b in stopped:  # what it wrote up to the stop; the rest is padding
                ids, truncated = row[:stopped[b]], False
            else:
                stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                ids = row if stop is None else row[:stop]
                truncated = stop is None and len(row) >= limit
            generation = Generation(
                text=self.tokenizer.decode(ids, skip_special_tokens=False),
                input_size=frame, truncated=truncated, repetition=b in stopped)
            if self.scores:
                n = len(ids)
                generation.tokens = self.token_texts(ids)
                generation.token_logprobs = logprobs[b, :n].tolist()
                generation.top_logprobs = [
                    alternatives(zip(self.token_texts(top_ids[b, i].tolist()),
                                     top_values[b, i].tolist(), strict=True))
                    for i in range(n)]
            results.append(generation)
        t3 = time.perf_counter()
        n = len(requests)
        for g in results:
            g.timings = {"preprocess": (t1 - t0) / n, "generate": (t2 - t1) / n,
                         "decode": (t3 - t2) / n}
        return results


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
