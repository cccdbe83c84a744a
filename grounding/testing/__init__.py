"""Test support that ships with the package: tiny random-weight checkpoints, a backend
with no model, and a loopback OpenAI-compatible server (``grounding.testing.loopback``)."""

from grounding.testing.tiny import (
    FAMILIES,
    QWEN_SPECIAL_TOKENS,
    TINY_SPECS,
    Family,
    StaticBackend,
    TinySpec,
    build_tiny_checkpoint,
    chat_template,
    tiny_checkpoint,
)

__all__ = [
    "FAMILIES",
    "QWEN_SPECIAL_TOKENS",
    "TINY_SPECS",
    "Family",
    "StaticBackend",
    "TinySpec",
    "build_tiny_checkpoint",
    "chat_template",
    "tiny_checkpoint",
]
