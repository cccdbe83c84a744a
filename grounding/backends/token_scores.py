"""What the local backend keeps of each generation step, in memory O(batch x top-k).

``generate(output_logits=True)`` keeps every step's batch x vocabulary logits (Qwen's
vocabulary is 151,936 rows): 2,048 steps of batch 4 are about 5 GB per copy. Scores need
far less: the log-probability of the chosen token and the TOP_LOGPROBS best
alternatives. :class:`StepRecorder` records exactly that at each step and lets the full
row go.

The numbers are the model's raw distribution (log-softmax of the logits the model
produced), as ``output_logits`` gave and as vLLM returns by default, not the scores after
generation-config processors such as a repetition penalty; the chosen token is the one
generate appended, so the record is exact under any decoding.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import lru_cache
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from grounding.core.repetition import DIGITS, repeating_ids


def top_k_and_lse(logits: torch.Tensor, k: int, chunk: int = 256,
                  scratch: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k values, their ids, log-sum-exp) of each row of a B x V float tensor.

    The same numbers as ``logits.topk(k)`` and ``logsumexp``, several times faster on
    the CPU for a vocabulary-wide row: each element of the top k lies in one of the k
    chunks of ``chunk`` columns with the largest maxima, so the full sort runs on k
    chunks only (columns past the last whole chunk are always candidates). ``scratch``, a
    tensor like ``logits``, saves allocating (and faulting in) one per call."""
    rows, width = logits.shape
    whole = width // chunk
    if whole <= k:
        values, ids = logits.topk(k, dim=-1)
        return values, ids, torch.logsumexp(logits, dim=-1)
    maxima = logits[:, : whole * chunk].view(rows, whole, chunk).amax(dim=-1)
    best = maxima.topk(k, dim=-1).indices
    offsets = torch.arange(chunk, device=logits.device)
    candidates = (best.unsqueeze(-1) * chunk + offsets).reshape(rows, -1)
    if whole * chunk < width:
        tail = torch.arange(whole * chunk, width, device=logits.device).expand(rows, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    values, at = logits.gather(1, candidates).topk(k, dim=-1)
    return values, candidates.gather(1, at), _logsumexp(logits, values[:, 0], scratch)


def _logsumexp(logits: torch.Tensor, top: torch.Tensor,
               scratch: torch.Tensor | None) -> torch.Tensor:
    """On the CPU, where one pass less is a tenth of a tiny model's step: exp without
    shifting by the maximum when no row can overflow or vanish in float32 (|max| < 60,
    as real logits are); anywhere else the fused, shifted ``torch.logsumexp``."""
    if logits.device.type != "cpu" or not bool((top.abs() < 60).all()):
        return torch.logsumexp(logits, dim=-1)
    exp = torch.exp(logits, out=scratch) if scratch is not None else logits.exp()
    return exp.sum(dim=-1).log_()


class StepRecorder(LogitsProcessor):
    """Per step: log p(chosen token) and the top-k (log-prob, id), for every row.

    Use as a context manager around ``generate(logits_processor=[recorder])``: it hooks
    the model's forward to see the raw logits of each step. A step's chosen token is read
    from ``input_ids`` at the next step (and from the sequences after the last), so only
    one step's logits are ever held beyond what generate itself holds.
    """

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        self.model = model
        self.k = k
        self._raw: torch.Tensor | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scratch: torch.Tensor | None = None
        self._chosen: list[torch.Tensor] = []
        self._top_values: list[torch.Tensor] = []
        self._top_ids: list[torch.Tensor] = []
        self._handle: Any = None

    def __enter__(self) -> StepRecorder:
        self._handle = self.model.register_forward_hook(self._keep_raw)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._raw = self._scratch = None

    def _keep_raw(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._raw = output.logits[:, -1, :]

    def _close_step(self, chosen: torch.Tensor) -> None:
        """Record the log-probability of the token chosen at the previous step."""
        if self._previous is not None:
            raw, lse = self._previous
            picked = raw.gather(-1, chosen.to(raw.device).unsqueeze(-1)).squeeze(-1)
            self._chosen.append(picked - lse)
            self._previous = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        self._close_step(input_ids[:, -1])
        raw = (scores if self._raw is None else self._raw).float()
        if self._scratch is None or self._scratch.shape != raw.shape:
            self._scratch = torch.empty_like(raw)
        values, ids, lse = top_k_and_lse(raw, self.k, scratch=self._scratch)
        self._top_values.append(values - lse.unsqueeze(-1))
        self._top_ids.append(ids)
        self._previous = (raw, lse)
        self._raw = None
        return scores

    def result(self, sequences: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen logprobs B x T, top values B x T x k, top ids B x T x k) on the CPU,
        given the sequences generate returned (their last column is the last choice)."""
        if not self._top_ids:
            raise RuntimeError("nothing was generated")
        self._close_step(sequences[:, -1])
        return (torch.stack(self._chosen, dim=1).cpu(),
                torch.stack(self._top_values, dim=1).cpu(),
                torch.stack(self._top_ids, dim=1).cpu())


class RowLimits(StoppingCriteria):
    """Stops each row at its own ``max_new_tokens``: a one-token question batched with a
    long detection request does not generate (nor count as truncated) past its limit."""

    def __init__(self, prompt_length: int, limits: Sequence[int]) -> None:
        self.prompt_length = prompt_length
        self.limits = torch.tensor(list(limits))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        return (generated >= self.limits).to(input_ids.device)


class RepetitionStop(StoppingCriteria):
    """Stops each row once its generated ids (after the prompt) end in runaway repetition
    (grounding.core.repetition.repeating_ids: one object text ``repeats`` times in a row,
    or one token over and over), and remembers where: ``stopped`` maps a row to the
    number of tokens it had generated then, the last of them completing the last copy.

    transformers keeps generating for the batch after a row stops: the row is padded with
    ``pad_token_id`` when an end-of-sequence criterion is in use, and otherwise goes on
    writing tokens that nobody reads. Either way, what a stopped row wrote is its first
    ``stopped[row]`` generated tokens. A row that has written one of ``ends``
    (end-of-sequence, padding) or gone past its own ``limits`` entry is finished and no
    longer checked (its padding is no repetition).

    Each step reads one new id per row (the whole rows again only when a step was
    missed) and checks only rows still running, at a cost of microseconds per row.
    """

    def __init__(self, prompt_length: int, limits: Sequence[int], *, repeats: int,
                 digits: Collection[int] | None, ends: Collection[int]) -> None:
        self.prompt_length = prompt_length
        self.limits = list(limits)
        self.repeats = repeats
        self.digits = digits
        self.ends = frozenset(ends)
        self.stopped: dict[int, int] = {}
        self._rows: list[list[int]] = []
        self._finished: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        if self._rows and all(len(row) == generated - 1 for row in self._rows):
            for row, token in zip(self._rows, input_ids[:, -1].tolist(), strict=True):
                row.append(token)
        else:
            self._rows = input_ids[:, self.prompt_length:].tolist()
            self._finished |= {b for b, row in enumerate(self._rows)
                               if not self.ends.isdisjoint(row[:-1])}
        done = []
        for b, row in enumerate(self._rows):
            if b not in self.stopped and b not in self._finished:
                if len(row) > self.limits[b] or not self.ends.isdisjoint(row[-1:]):
                    self._finished.add(b)
                elif repeating_ids(row, repeats=self.repeats, digits=self.digits):
                    self.stopped[b] = len(row)
            done.append(b in self.stopped)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def digit_ids(tokenizer: Any) -> frozenset[int]:
    """The ids whose text (as TokenTexts gives it) holds an ASCII digit: what a repeated
    object must hold (grounding.core.repetition). A token's text can only hold a digit
    when its vocabulary piece does (byte-level pieces keep digits as themselves, byte
    fallbacks spell them ``<0x3N>``), so only those pieces and the added tokens are
    decoded."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = set(tokenizer.added_tokens_decoder)
    candidates = [i for i, piece in enumerate(pieces)
                  if i in added or (piece is not None and not DIGITS.isdisjoint(piece))]
    texts = TokenTexts(tokenizer)(candidates)
    return frozenset(i for i, text in zip(candidates, texts, strict=True)
                     if not DIGITS.isdisjoint(text))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenTexts:
    """The text of each token id, as ``tokenizer.decode([id])`` gives it, without one decode
    call per token: byte-level tokens are mapped back to bytes and decoded as UTF-8 (a
    token holding part of a character gives U+FFFD, as decode does); added tokens (Qwen's
    specials) are their own text. Texts are cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._bytes = _byte_decoder()
        self._cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        missing = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if missing:
            pieces = self.tokenizer.convert_ids_to_tokens(missing)
            for i, piece in zip(missing, pieces, strict=True):
                self._cache[i] = self._text(i, piece)
        return [self._cache[i] for i in ids]

    def _text(self, token_id: int, piece: str | None) -> str:
        if token_id in self._added:
            return self._added[token_id]
        if piece is None:
            return ""
        try:
            raw = bytes(self._bytes[c] for c in piece)
        except KeyError:  # not a byte-level vocabulary: ask the tokenizer
            return self.tokenizer.decode([token_id], skip_special_tokens=False)
        return raw.decode("utf-8", errors="replace")
