"""Test support that ships with the package: tiny random-weight checkpoints
(``grounding.testing.tiny``), a backend with no model (``grounding.testing.static``), and a
loopback OpenAI-compatible server (``grounding.testing.loopback``)."""

from grounding.testing.static import StaticBackend
from grounding.testing.tiny import (
    FAMILIES,
    QWEN_SPECIAL_TOKENS,
    TINY_SPECS,
    Family,
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
