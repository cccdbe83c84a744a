"""The settings of each backend, with their defaults and help: declared once, here.

Three sides read these dataclasses, so a default changes in one place:

* the backend constructors take their defaults from them
  (``timeout: float = RemoteOptions.timeout``);
* the command line generates its backend options from the fields (grounding.cli.options);
* a run directory records and checks the fields marked ``labels`` (grounding.runs).

Each field's ``metadata`` (written with :func:`setting`) says:

``help``
    The option's help, without the backend's prefix: the command line adds ``local: `` or
    ``openai: `` to the fields of LocalOptions and RemoteOptions (:attr:`BackendOptions.kind`).
``labels``
    The setting changes what the labels mean (the model, how it writes boxes, the pixels it
    sees, how long it may answer): a labelling run records it in run.json and refuses to
    resume with another value.
``missing``
    Only for a ``labels`` setting added after run directories exist: what a run.json
    written before it was recorded means, so that older runs still resume.
``cli``
    ``"backend"``: an option of every command that runs a model; ``"command"``: each command
    declares the option itself, with its own default (max_new_tokens: ask answers short);
    ``None``: no option.
``flag``, ``cli_type``
    The option's parameter name and type when they differ from the field's (the
    repeatable ``--header 'Name: value'`` fills ``headers``).
``min``, ``max``
    The range the command line accepts.

Plain data only: no command-line library is imported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from grounding.core.dialects import Dialect
from grounding.core.repetition import DEFAULT_REPEATS

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
"""The local backend's model when none is given."""

DEFAULT_MAX_NEW_TOKENS = 2048
"""A Qwen2.5-VL box line is about 30 tokens: 2048 leaves room for about 60 boxes."""

_NOT_RECORDED = object()

_MODEL_HELP = (f"local: hub id or checkpoint directory (default {DEFAULT_MODEL}); openai: the "
               "served model name (default: the first the server lists).")


def setting(default: Any, help: str, *, labels: bool = False, missing: Any = _NOT_RECORDED,
            cli: str | None = "backend", flag: str | None = None, cli_type: Any = None,
            min: float | None = None, max: float | None = None) -> Any:
    """A dataclass field carrying its help and role (see the module's docstring)."""
    if cli not in ("backend", "command", None):
        raise ValueError(f"cli must be 'backend', 'command' or None, not {cli!r}")
    metadata = {"help": help, "labels": labels, "cli": cli, "flag": flag,
                "cli_type": cli_type, "min": min, "max": max}
    if missing is not _NOT_RECORDED:
        metadata["missing"] = missing
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class BackendOptions:
    """What every backend takes."""

    kind: ClassVar[str | None] = None
    """The --backend value naming this backend (None: common to all)."""

    model: str | None = setting(None, _MODEL_HELP, labels=True)
    dialect: str | None = setting(
        None, "How the model writes boxes (default: from the checkpoint's config, or guessed "
              "from the served model name).", labels=True)
    min_pixels: int | None = setting(
        None, "Pixel budget: smallest model frame (default: the dialect's, see README).",
        labels=True)
    max_pixels: int | None = setting(
        None, "Pixel budget: largest model frame (default: the dialect's, see README).",
        labels=True)
    max_new_tokens: int = setting(
        DEFAULT_MAX_NEW_TOKENS, "Generation limit; an answer that hits it is flagged "
                                "truncated.", labels=True, cli="command", min=1)
    stop_repeats: int = setting(
        DEFAULT_REPEATS, "An answer that degenerates into writing the same object text "
                         "this many times in a row is flagged repetition (the local "
                         "backend stops it there; what it wrote is kept); 0 turns it off.",
        labels=True, missing=0, min=0)


@dataclass(frozen=True)
class LocalOptions(BackendOptions):
    """transformers in this process (grounding.backends.local.LocalBackend)."""

    kind: ClassVar[str | None] = "local"

    model: str = setting(DEFAULT_MODEL, _MODEL_HELP, labels=True)
    device: str | None = setting(
        None, "cuda, cuda:N, cpu, or auto to spread a model over all GPUs (default: the "
              "first GPU, else the CPU).")


@dataclass(frozen=True)
class RemoteOptions(BackendOptions):
    """An OpenAI-compatible server (grounding.backends.remote OpenAIBackend)."""

    kind: ClassVar[str | None] = "openai"

    base_url: str | None = setting(
        None, "server URL including /v1, e.g. http://gpu-box:8000/v1.")
    api_key_env: str | None = setting(
        None, "name of the environment variable holding the API key.")
    api_key_header: str = setting(
        "Authorization", "header carrying the key; Authorization sends 'Bearer KEY', any "
                         "other header (e.g. x-api-key) the bare key.")
    headers: Mapping[str, str] | None = setting(
        None, "extra header 'Name: value' (repeatable).", flag="header",
        cli_type=list[str] | None)
    endpoint: str = setting(
        "/chat/completions", "path under --base-url (or a full URL) taking chat requests.")
    concurrency: int = setting(8, "requests in flight.", min=1)
    timeout: float = setting(120.0, "seconds per request.")
    max_retries: int = setting(
        5, "retries on 429, 5xx, connection errors and timeouts.", min=0)
    token_param: str = setting("max_tokens", "max_tokens or max_completion_tokens.")
    logprobs: bool = setting(True, "ask for token log-probabilities.")
    json_schema: bool = setting(
        False, "ask the server for JSON-schema-constrained output (vLLM).", cli="command")
    image_format: str = setting(
        "jpeg", "how the model frame is sent: jpeg (quality 95: a fraction of PNG's encode "
                "time and bytes) or png (lossless).")
    text_first: bool = setting(
        False, "put the text before the images in the message (as Qianfan's examples do); "
               "the default is images first, as Qwen's.")


BACKENDS: dict[str, type[BackendOptions]] = {"local": LocalOptions, "openai": RemoteOptions}
"""Each --backend value's options."""


def own_fields(cls: type[BackendOptions]) -> list[dataclasses.Field]:
    """The fields ``cls`` adds to BackendOptions (all of them for BackendOptions itself)."""
    common = set() if cls is BackendOptions else set(BackendOptions.__dataclass_fields__)
    return [f for f in dataclasses.fields(cls) if f.name not in common]


def _label_fields() -> list[dataclasses.Field]:
    seen: dict[str, dataclasses.Field] = {}
    for cls in (BackendOptions, *BACKENDS.values()):
        for f in dataclasses.fields(cls):
            if f.metadata.get("labels"):
                seen.setdefault(f.name, f)
    return list(seen.values())


LABEL_KEYS: tuple[str, ...] = tuple(f.name for f in _label_fields())
"""The settings that change what labels mean, in declaration order: run.json records
them and a run resumes only with the same values."""

LABEL_MISSING: dict[str, Any] = {f.name: f.metadata["missing"] for f in _label_fields()
                                 if "missing" in f.metadata}
"""What a run.json written before a ``labels`` setting was recorded means for it."""


def label_settings(backend: Any) -> dict[str, Any]:
    """The LABEL_KEYS settings of a backend, as run.json records them (a dialect by its
    name; a backend without a setting has None)."""
    settings = {}
    for name in LABEL_KEYS:
        value = getattr(backend, name, None)
        settings[name] = value.name if isinstance(value, Dialect) else value
    return settings
